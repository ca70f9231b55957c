//! The `layerd` server binary: parse the configuration, set up logging, serve.

use std::process::ExitCode;

use clap::Parser;
use layerd::config::Config;

#[tokio::main]
async fn main() -> ExitCode {
    let config = Config::parse();
    layerd::telemetry::init(config.log_format);
    match layerd::server::serve(config).await {
        Ok(()) => ExitCode::SUCCESS,
        Err(error) => {
            tracing::error!(%error, "layerd failed");
            ExitCode::FAILURE
        }
    }
}
