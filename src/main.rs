use clap::Parser;

use tiller::cli::{Cli, Command, LogFormat};

fn main() -> std::process::ExitCode {
    tiller::models::cpu_kernels::tune_process();
    let cli = Cli::parse();
    let filter = tracing_subscriber::EnvFilter::try_from_default_env()
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info"));
    let logs = tracing_subscriber::fmt().with_env_filter(filter).with_writer(std::io::stderr);
    match cli.log_format {
        // Spans (request_id, job_id) come along as fields of each line.
        LogFormat::Json => logs.json().with_current_span(true).with_span_list(false).init(),
        LogFormat::Text => logs.init(),
    }
    let result: anyhow::Result<()> = match cli.command {
        Command::Serve(args) => match args.config() {
            Ok(cfg) => tokio::runtime::Builder::new_multi_thread()
                .enable_all()
                .build()
                .map_err(anyhow::Error::from)
                .and_then(|rt| rt.block_on(tiller::api::serve(cfg))),
            Err(e) => Err(e.into()),
        },
        Command::Generate(args) => tiller::cli::generate(&args).map_err(Into::into),
        Command::Models(args) => tiller::cli::list_models(&args).map_err(Into::into),
        Command::Shapes(args) => tiller::shapes::cli::run_shapes(&args).map_err(Into::into),
        Command::Eval(args) => tiller::shapes::cli::run_eval(&args).map_err(Into::into),
        Command::Experiment(args) => tiller::experiments::offline::run_command(&args).map_err(Into::into),
        Command::Openapi => {
            print!("{}", tiller::api::openapi_json());
            Ok(())
        }
    };
    match result {
        Ok(()) => std::process::ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("error: {e:#}");
            std::process::ExitCode::FAILURE
        }
    }
}
