//! A quick client loop: one session per worker, Forward then Backward on a
//! layer, as fast as the server answers, every answer checked. Prints calls
//! per second. (The full load generator is a separate tool; this is the
//! smallest honest measurement.)
//!
//! ```text
//! cargo run --release --example quick_loop -- --addr 127.0.0.1:50051 --kind relu --elements 1024 --seconds 10
//! ```

use std::time::{Duration, Instant};

use clap::Parser;
use layerd::pb::{self, layer_service_client::LayerServiceClient};

#[derive(Parser)]
struct Args {
    #[arg(long, default_value = "127.0.0.1:50051")]
    addr: String,
    #[arg(long, default_value = "relu")]
    kind: String,
    #[arg(long, default_value_t = 1024)]
    elements: usize,
    #[arg(long, default_value_t = 10.0)]
    seconds: f64,
    /// Workers, each with its own connection, session and one call in flight.
    #[arg(long, default_value_t = 1)]
    workers: usize,
}

fn tensor(values: &[f32]) -> pb::Tensor {
    pb::Tensor {
        dtype: pb::DType::DtypeFloat32.into(),
        shape: vec![values.len() as u64],
        data: bytemuck::cast_slice::<f32, u8>(values).to_vec().into(),
    }
}

fn values(t: &pb::Tensor) -> Vec<f32> {
    t.data
        .chunks_exact(4)
        .map(|c| f32::from_le_bytes(c.try_into().unwrap()))
        .collect()
}

async fn worker(
    args: &Args,
    index: usize,
) -> Result<u64, Box<dyn std::error::Error + Send + Sync>> {
    let mut client = LayerServiceClient::connect(format!("http://{}", args.addr)).await?;
    let session = client
        .create_session(pb::CreateSessionRequest::default())
        .await?
        .into_inner()
        .session_id;
    client
        .create_layer(pb::CreateLayerRequest {
            session_id: session.clone(),
            layer_id: "l".into(),
            kind: args.kind.clone(),
        })
        .await?;
    let x: Vec<f32> = (0..args.elements)
        .map(|i| ((i * 7 + index) % 13) as f32 - 6.0)
        .collect();
    let dout: Vec<f32> = (0..args.elements).map(|i| (i % 5) as f32 - 2.5).collect();
    let (x_t, dout_t) = (tensor(&x), tensor(&dout));
    let deadline = Instant::now() + Duration::from_secs_f64(args.seconds);
    let mut calls = 0u64;
    while Instant::now() < deadline {
        let y = client
            .forward(pb::ForwardRequest {
                session_id: session.clone(),
                layer_id: "l".into(),
                x: Some(x_t.clone()),
                no_grad: false,
            })
            .await?
            .into_inner()
            .y
            .ok_or("no y")?;
        let dx = client
            .backward(pb::BackwardRequest {
                session_id: session.clone(),
                layer_id: "l".into(),
                dout: Some(dout_t.clone()),
            })
            .await?
            .into_inner()
            .dx
            .ok_or("no dx")?;
        if args.kind == "relu" {
            let (y, dx) = (values(&y), values(&dx));
            for i in 0..args.elements {
                let keep = x[i] > 0.0;
                if y[i] != if keep { x[i] } else { 0.0 }
                    || dx[i] != if keep { dout[i] } else { 0.0 }
                {
                    return Err(format!("wrong answer at element {i}").into());
                }
            }
        }
        calls += 2;
    }
    client
        .close_session(pb::CloseSessionRequest {
            session_id: session,
        })
        .await?;
    Ok(calls)
}

#[tokio::main]
async fn main() -> Result<(), Box<dyn std::error::Error>> {
    let args: &'static Args = Box::leak(Box::new(Args::parse()));
    let started = Instant::now();
    let tasks: Vec<_> = (0..args.workers)
        .map(|i| tokio::spawn(worker(args, i)))
        .collect();
    let mut calls = 0;
    for task in tasks {
        calls += task.await?.map_err(|e| e.to_string())?;
    }
    let elapsed = started.elapsed().as_secs_f64();
    println!(
        "kind={} elements={} workers={} calls={} seconds={:.2} calls_per_s={:.0} pairs_per_s={:.0}",
        args.kind,
        args.elements,
        args.workers,
        calls,
        elapsed,
        calls as f64 / elapsed,
        calls as f64 / elapsed / 2.0
    );
    Ok(())
}
