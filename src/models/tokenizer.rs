//! (in progress: placeholder with the agreed interface until the CLIP tokenizer lands)

use std::path::Path;

pub struct Encoded {
    pub ids: Vec<u32>,
    pub truncated: bool,
}

pub struct ClipTokenizer;

impl ClipTokenizer {
    pub fn from_dir(dir: &Path) -> crate::error::Result<Self> {
        Err(crate::error::TillerError::file(dir, "tokenizer not implemented yet"))
    }
    pub fn encode(&self, _text: &str) -> Encoded {
        Encoded { ids: vec![], truncated: false }
    }
    pub fn max_len(&self) -> usize {
        77
    }
}
