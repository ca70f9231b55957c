//! layerd-cli: a small command-line client for people: list the kinds, check
//! health, and try a layer on a few numbers.
//!
//! ```text
//! layerd-cli kinds
//! layerd-cli health
//! layerd-cli try relu 1,-2,3.5
//! ```

use std::{process::ExitCode, time::Duration};

use clap::{Parser, Subcommand, ValueEnum};
use layerd::client::Bearer;
use layerd::pb::{self, layer_service_client::LayerServiceClient};
use layerd::tensor::Tensor;
use tonic::{service::interceptor::InterceptedService, transport::Channel};
use tonic_health::pb::{
    health_check_response::ServingStatus, health_client::HealthClient, HealthCheckRequest,
};

/// layerd-cli: talk to a layerd server from the command line.
///
/// Exit codes: 0 success (for `health`: SERVING); 1 the call failed or the
/// server is not serving; 2 the server cannot be reached.
#[derive(Debug, Parser)]
#[command(name = "layerd-cli", version, about, long_about)]
struct Cli {
    /// Server address: host:port, or https://host:port for TLS (as do the --tls-* options).
    #[arg(
        long,
        env = "LAYERD_ADDR",
        default_value = "127.0.0.1:50051",
        global = true
    )]
    addr: String,

    /// Bearer token sent on every layer call (for a server started with --auth-tokens).
    #[arg(long, env = "LAYERD_TOKEN", hide_env_values = true, global = true)]
    token: Option<String>,

    /// How long to wait for the server.
    #[arg(long, default_value = "5s", value_parser = humantime::parse_duration, global = true)]
    timeout: Duration,

    #[command(flatten)]
    tls: layerd::client::TlsArgs,

    #[command(subcommand)]
    command: Command,
}

#[derive(Debug, Subcommand)]
enum Command {
    /// List the layer kinds the server offers.
    Kinds,
    /// Check grpc.health.v1: exits 0 if and only if the service is SERVING.
    Health {
        /// The service to ask about; "" is the whole server.
        #[arg(long, default_value = "")]
        service: String,
    },
    /// Open a session, run Forward on VALUES then Backward with dout = 1, print y and dx, close.
    Try {
        /// Layer kind, e.g. relu.
        kind: String,
        /// Comma-separated numbers, e.g. 1,-2,3.5 (use `--` before a leading minus).
        #[arg(allow_hyphen_values = true)]
        values: String,
        /// Element type.
        #[arg(long, value_enum, default_value_t = Dtype::F32)]
        dtype: Dtype,
    },
}

#[derive(Debug, Clone, Copy, ValueEnum)]
enum Dtype {
    F32,
    F64,
}

enum Failure {
    Unreachable(String),
    Call(String),
}

#[tokio::main]
async fn main() -> ExitCode {
    let cli = Cli::parse();
    let result = match connect(&cli.addr, cli.timeout, &cli.tls).await {
        Ok(channel) => match layerd::client::Bearer::new(cli.token.as_deref()) {
            Ok(bearer) => run(cli.command, channel, bearer).await,
            Err(message) => Err(Failure::Call(message)),
        },
        Err(failure) => Err(failure),
    };
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(Failure::Call(message)) => {
            eprintln!("layerd-cli: {message}");
            ExitCode::from(1)
        }
        Err(Failure::Unreachable(message)) => {
            eprintln!("layerd-cli: {message}");
            ExitCode::from(2)
        }
    }
}

async fn connect(
    addr: &str,
    timeout: Duration,
    tls: &layerd::client::TlsArgs,
) -> Result<Channel, Failure> {
    let endpoint = layerd::client::endpoint(addr, timeout, tls).map_err(Failure::Unreachable)?;
    layerd::client::connect(&endpoint.timeout(timeout.max(Duration::from_secs(30))))
        .await
        .map_err(Failure::Unreachable)
}

fn failed(status: tonic::Status) -> Failure {
    Failure::Call(layerd::client::status_text(&status))
}

async fn run(command: Command, channel: Channel, bearer: Bearer) -> Result<(), Failure> {
    match command {
        Command::Kinds => {
            let kinds = LayerServiceClient::with_interceptor(channel, bearer)
                .list_layer_kinds(pb::ListLayerKindsRequest {})
                .await
                .map_err(failed)?
                .into_inner()
                .kinds;
            let width = kinds.iter().map(|k| k.name.len()).max().unwrap_or(0);
            for kind in kinds {
                println!("{:width$}  {}", kind.name, kind.description);
            }
            Ok(())
        }
        Command::Health { service } => {
            let status = HealthClient::new(channel)
                .check(HealthCheckRequest {
                    service: service.clone(),
                })
                .await
                .map_err(failed)?
                .into_inner()
                .status();
            let name = if service.is_empty() {
                "server"
            } else {
                service.as_str()
            };
            println!("{name}: {}", status.as_str_name());
            if status == ServingStatus::Serving {
                Ok(())
            } else {
                Err(Failure::Call(format!("{name} is not serving")))
            }
        }
        Command::Try {
            kind,
            values,
            dtype,
        } => {
            try_layer(
                LayerServiceClient::with_interceptor(channel, bearer),
                &kind,
                &values,
                dtype,
            )
            .await
        }
    }
}

fn parse_values(text: &str) -> Result<Vec<f64>, Failure> {
    text.split(',')
        .map(|v| {
            v.trim()
                .parse::<f64>()
                .map_err(|e| Failure::Call(format!("{v:?} is not a number: {e}")))
        })
        .collect()
}

fn to_tensor(values: &[f64], dtype: Dtype) -> pb::Tensor {
    let dim = ndarray::IxDyn(&[values.len()]);
    let tensor = match dtype {
        Dtype::F32 => Tensor::from_array(
            ndarray::ArrayD::from_shape_vec(dim, values.iter().map(|&v| v as f32).collect())
                .expect("1-D"),
        ),
        Dtype::F64 => {
            Tensor::from_array(ndarray::ArrayD::from_shape_vec(dim, values.to_vec()).expect("1-D"))
        }
    };
    tensor.into_proto()
}

fn show(tensor: Option<pb::Tensor>, field: &str) -> Result<String, Failure> {
    let tensor = Tensor::from_proto(tensor, field)
        .map_err(|e| Failure::Call(format!("the server sent a bad {field}: {e}")))?;
    let values: Vec<String> = match tensor.dtype() {
        layerd::dtype::DType::F32 => tensor.view::<f32>().iter().map(|v| v.to_string()).collect(),
        layerd::dtype::DType::F64 => tensor.view::<f64>().iter().map(|v| v.to_string()).collect(),
    };
    Ok(format!("[{}]", values.join(", ")))
}

async fn try_layer(
    mut client: LayerServiceClient<InterceptedService<Channel, Bearer>>,
    kind: &str,
    values: &str,
    dtype: Dtype,
) -> Result<(), Failure> {
    let x = parse_values(values)?;
    let session_id = client
        .create_session(pb::CreateSessionRequest {
            session_id: String::new(),
            idle_timeout_seconds: 60,
        })
        .await
        .map_err(failed)?
        .into_inner()
        .session_id;
    let outcome = async {
        client
            .create_layer(pb::CreateLayerRequest {
                session_id: session_id.clone(),
                layer_id: "try".into(),
                kind: kind.into(),
                ..Default::default()
            })
            .await
            .map_err(failed)?;
        let y = client
            .forward(pb::ForwardRequest {
                session_id: session_id.clone(),
                layer_id: "try".into(),
                x: Some(to_tensor(&x, dtype)),
                no_grad: false,
                ..Default::default()
            })
            .await
            .map_err(failed)?
            .into_inner()
            .y;
        let dx = client
            .backward(pb::BackwardRequest {
                session_id: session_id.clone(),
                layer_id: "try".into(),
                dout: Some(to_tensor(&vec![1.0; x.len()], dtype)),
                ..Default::default()
            })
            .await
            .map_err(failed)?
            .into_inner()
            .dx;
        println!("y  = {}", show(y, "y")?);
        println!("dx = {}   (dout = ones)", show(dx, "dx")?);
        Ok(())
    }
    .await;
    let closed = client
        .close_session(pb::CloseSessionRequest { session_id })
        .await;
    outcome?;
    closed.map(|_| ()).map_err(failed)
}
