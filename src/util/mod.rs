pub mod tensor_io;
