//! The `layerd` server binary: parse the configuration, set up logging, serve.

use std::process::ExitCode;

use clap::Parser;
use layerd::config::Config;

fn main() -> ExitCode {
    // Before the runtime's threads exist.
    layerd::allocator::tune();
    let config = Config::parse();
    let mut runtime = tokio::runtime::Builder::new_multi_thread();
    if let Some(workers) = config.worker_threads {
        runtime.worker_threads(workers.get());
    }
    runtime
        .enable_all()
        .build()
        .expect("the tokio runtime starts")
        .block_on(serve(config))
}

async fn serve(config: Config) -> ExitCode {
    layerd::telemetry::init(config.log_format);
    match layerd::server::serve(config).await {
        Ok(()) => ExitCode::SUCCESS,
        Err(error) => {
            tracing::error!(%error, "layerd failed");
            ExitCode::FAILURE
        }
    }
}
