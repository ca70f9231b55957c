//! The bundled tools against a real server: layerd-bench verifies every answer
//! (and fails when they are wrong), layerd-cli lists, checks and tries.

mod common;

use std::process::Output;

use common::*;
use tokio::process::Command;

async fn bench(server: &TestServer, args: &[&str]) -> Output {
    let addr = server.addr.to_string();
    Command::new(env!("CARGO_BIN_EXE_layerd-bench"))
        .args(["--addr", &addr, "--quiet", "--warmup", "0s"])
        .args(args)
        .env_remove("LAYERD_ADDR")
        .output()
        .await
        .unwrap()
}

fn text(output: &Output) -> String {
    format!(
        "{}{}",
        String::from_utf8_lossy(&output.stdout),
        String::from_utf8_lossy(&output.stderr)
    )
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_mode_and_kind_verifies_clean() {
    let server = start(|_| {}).await;
    let dir = std::env::temp_dir().join(format!("layerd-bench-test-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    for (mode, kind, dtype, extra) in [
        ("train", "relu", "f32", &["--concurrency", "4"][..]),
        ("train", "sigmoid", "f64", &["--shape", "3x5x7"][..]),
        ("forward", "identity", "f32", &["--elements", "40000"][..]),
        (
            "stream",
            "sigmoid",
            "f32",
            &["--connections", "2", "--concurrency", "2"][..],
        ),
        (
            "train",
            "relu",
            "f64",
            &[
                "--shared-sessions",
                "1",
                "--concurrency",
                "3",
                "--session-header",
            ][..],
        ),
        ("train", "relu", "f32", &["--rate", "400"][..]),
        // The trainable kinds: client-given parameters, gradients checked too.
        ("train", "affine", "f32", &["--shape", "8x4x5"][..]),
        ("stream", "convolution", "f64", &["--shape", "2x2x7x6"][..]),
        ("train", "pooling", "f32", &["--shape", "2x3x6x5"][..]),
        ("train", "batch_norm", "f64", &["--shape", "6x3x2x2"][..]),
        ("stream", "dropout", "f32", &["--elements", "2000"][..]),
        ("train", "softmax_with_loss", "f32", &["--shape", "5x4"][..]),
    ] {
        let json = dir.join(format!("{mode}-{kind}-{dtype}.json"));
        let args = [
            &[
                "--mode",
                mode,
                "--kind",
                kind,
                "--dtype",
                dtype,
                "--requests",
                "60",
                "--json",
                json.to_str().unwrap(),
            ][..],
            extra,
        ]
        .concat();
        let output = bench(&server, &args).await;
        assert!(
            output.status.success(),
            "{mode} {kind} {dtype} {extra:?}: {}",
            text(&output)
        );
        let report: serde_json::Value =
            serde_json::from_str(&std::fs::read_to_string(&json).unwrap()).unwrap();
        let run = &report["runs"][0];
        assert!(run["calls"].as_u64().unwrap() >= 60, "{run}");
        assert_eq!(run["mismatches"], 0);
        assert!(run["errors"].as_object().unwrap().is_empty());
        assert!(run["latency_us"]["p99"].as_u64().unwrap() > 0);
        assert!(
            text(&output).contains("mismatches    0"),
            "{}",
            text(&output)
        );
    }
    std::fs::remove_dir_all(&dir).unwrap();
    server.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn train_step_mode_verifies_each_network() {
    let server = start(|_| {}).await;
    // (The convnet's reference is minutes of loops in a debug build: it is
    // verified in the release run of bench/train.py.)
    for (network, dtype, cycle) in [("two-layer", "f64", "4"), ("mlp", "f32", "3")] {
        let output = bench(
            &server,
            &[
                "--mode",
                "train-step",
                "--network",
                network,
                "--dtype",
                dtype,
                "--cycle-steps",
                cycle,
                "--requests",
                "6",
            ],
        )
        .await;
        assert!(output.status.success(), "{network}: {}", text(&output));
        let out = text(&output);
        assert!(
            out.contains("mismatches    0") && out.contains(&format!("network {network}")),
            "{out}"
        );
    }
    // A reference trained with another learning rate: from the second step on
    // every loss differs, and the run must say so.
    let output = bench(
        &server,
        &[
            "--mode",
            "train-step",
            "--network",
            "two-layer",
            "--cycle-steps",
            "3",
            "--requests",
            "6",
            "--verify-lr",
            "0.2",
        ],
    )
    .await;
    assert_eq!(output.status.code(), Some(3), "{}", text(&output));
    server.stop().await;
}

#[tokio::test]
async fn wrong_answers_make_the_exit_code_non_zero() {
    // The server computes identity; the reference expects ReLU: every answer
    // with a negative element differs, and the run must say so.
    // Likewise a dropout layer checked as identity (half its outputs are 0),
    // and an affine layer's answers checked as batch_norm's.
    let server = start(|_| {}).await;
    for (kind, verify_as, shape) in [
        ("identity", "relu", "1024"),
        ("dropout", "identity", "1024"),
        ("affine", "batch_norm", "6x10"),
    ] {
        let output = bench(
            &server,
            &[
                "--kind",
                kind,
                "--verify-as",
                verify_as,
                "--shape",
                shape,
                "--requests",
                "20",
            ],
        )
        .await;
        assert_eq!(output.status.code(), Some(3), "{kind}: {}", text(&output));
        assert!(
            text(&output).contains("answers differed from the reference"),
            "{}",
            text(&output)
        );
    }
    server.stop().await;
}

#[tokio::test]
async fn failed_calls_are_counted_by_code_and_fail_the_run() {
    // A 64 KiB message limit refuses the 100 KB tensors: RESOURCE_EXHAUSTED.
    let server = start(|c| c.max_message_bytes = bytesize::ByteSize::kib(64)).await;
    let output = bench(&server, &["--elements", "25000", "--requests", "5"]).await;
    assert_eq!(output.status.code(), Some(4), "{}", text(&output));
    assert!(
        text(&output).contains("ResourceExhausted"),
        "{}",
        text(&output)
    );
    let output = bench(
        &server,
        &["--elements", "25000", "--requests", "5", "--allow-errors"],
    )
    .await;
    assert_eq!(output.status.code(), Some(0), "{}", text(&output));
    server.stop().await;
}

#[tokio::test]
async fn a_server_that_is_down_is_a_clear_error_not_a_hang() {
    let server = start(|_| {}).await;
    let addr = server.addr;
    server.stop().await;
    let started = std::time::Instant::now();
    let output = Command::new(env!("CARGO_BIN_EXE_layerd-bench"))
        .args(["--addr", &addr.to_string(), "--duration", "1s"])
        .output()
        .await
        .unwrap();
    assert_eq!(output.status.code(), Some(2), "{}", text(&output));
    assert!(
        text(&output).contains("cannot connect"),
        "{}",
        text(&output)
    );
    assert!(started.elapsed() < std::time::Duration::from_secs(10));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_sweep_writes_its_table_json_and_chart() {
    let server = start(|_| {}).await;
    let prefix = std::env::temp_dir().join(format!("layerd-sweep-{}", std::process::id()));
    let json = prefix.with_extension("json");
    let output = bench(
        &server,
        &[
            "--sweep",
            "16,4096",
            "--kind",
            "relu,identity",
            "--duration",
            "300ms",
            "--json",
            json.to_str().unwrap(),
            "--chart",
            prefix.to_str().unwrap(),
        ],
    )
    .await;
    assert!(output.status.success(), "{}", text(&output));
    let stdout = String::from_utf8_lossy(&output.stdout);
    assert_eq!(
        stdout
            .lines()
            .filter(|l| l.starts_with("| layerd |"))
            .count(),
        4,
        "{stdout}"
    );
    let svg = std::fs::read_to_string(prefix.with_extension("svg")).unwrap();
    assert!(
        svg.contains("<svg") && svg.contains("layerd relu"),
        "the legend names each line"
    );
    let png = std::fs::read(prefix.with_extension("png")).unwrap();
    assert_eq!(&png[1..4], b"PNG");
    // The chart subcommand redraws from JSON files.
    let merged = prefix.with_file_name(format!("layerd-merged-{}", std::process::id()));
    let output = Command::new(env!("CARGO_BIN_EXE_layerd-bench"))
        .args([
            "chart",
            json.to_str().unwrap(),
            "--out",
            merged.to_str().unwrap(),
        ])
        .output()
        .await
        .unwrap();
    assert!(output.status.success(), "{}", text(&output));
    assert!(merged.with_extension("svg").exists());
    for path in [
        json,
        prefix.with_extension("svg"),
        prefix.with_extension("png"),
        merged.with_extension("svg"),
        merged.with_extension("png"),
    ] {
        std::fs::remove_file(path).unwrap();
    }
    server.stop().await;
}

#[tokio::test]
async fn the_cli_lists_checks_and_tries() {
    let server = start(|_| {}).await;
    let addr = server.addr.to_string();
    let cli = |args: &[&str]| {
        let mut command = Command::new(env!("CARGO_BIN_EXE_layerd-cli"));
        command.env("LAYERD_ADDR", &addr).args(args);
        command
    };
    let kinds = cli(&["kinds"]).output().await.unwrap();
    assert!(kinds.status.success());
    let kinds = String::from_utf8_lossy(&kinds.stdout);
    assert!(
        kinds.contains("identity") && kinds.contains("relu") && kinds.contains("sigmoid"),
        "{kinds}"
    );

    let health = cli(&["health"]).output().await.unwrap();
    assert!(health.status.success());
    assert_eq!(
        String::from_utf8_lossy(&health.stdout).trim(),
        "server: SERVING"
    );

    let tried = cli(&["try", "relu", "1,-2,3.5"]).output().await.unwrap();
    assert!(tried.status.success(), "{}", text(&tried));
    assert_eq!(
        String::from_utf8_lossy(&tried.stdout),
        "y  = [1, 0, 3.5]\ndx = [1, 0, 1]   (dout = ones)\n"
    );

    let unknown = cli(&["try", "tanh", "1"]).output().await.unwrap();
    assert_eq!(unknown.status.code(), Some(1));
    assert!(
        text(&unknown).contains("InvalidArgument"),
        "{}",
        text(&unknown)
    );
    server.stop().await;

    let down = cli(&["health"]).output().await.unwrap();
    assert_eq!(down.status.code(), Some(2), "{}", text(&down));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_kserve_protocol_verifies_clean_with_and_without_shared_memory() {
    let server = start(|config| config.allow_client_shm = true).await;
    for args in [
        &["--mode", "forward"][..],
        &[
            "--mode",
            "forward",
            "--model",
            "relu_no_grad",
            "--dtype",
            "f16",
        ][..],
        &[
            "--mode",
            "forward",
            "--sequence-length",
            "3",
            "--session-header",
        ][..],
        &["--mode", "train", "--kind", "sigmoid", "--dtype", "f64"][..],
        &[
            "--mode",
            "forward",
            "--shared-memory",
            "system",
            "--concurrency",
            "3",
        ][..],
        &[
            "--mode",
            "train",
            "--shared-memory",
            "system",
            "--sequence-length",
            "2",
        ][..],
        // Both tensors in regions: streamed in chunks (more than one here).
        &[
            "--mode",
            "forward",
            "--shared-memory",
            "system",
            "--elements",
            "200000",
        ][..],
    ] {
        let output = bench(
            &server,
            &[&["--protocol", "kserve", "--requests", "24"], args].concat(),
        )
        .await;
        assert_eq!(output.status.code(), Some(0), "{args:?}: {}", text(&output));
        assert!(
            text(&output).contains("mismatches    0"),
            "{}",
            text(&output)
        );
    }
    // The verifier catches wrong answers over KServe and shared memory too.
    let wrong = bench(
        &server,
        &[
            "--protocol",
            "kserve",
            "--kind",
            "identity",
            "--verify-as",
            "relu",
            "--shared-memory",
            "system",
            "--requests",
            "10",
        ],
    )
    .await;
    assert_eq!(wrong.status.code(), Some(3), "{}", text(&wrong));
    // Every region was unregistered and every object removed.
    let mut kserve =
        layerd::pb::inference::grpc_inference_service_client::GrpcInferenceServiceClient::new(
            server.channel().await,
        );
    let status = kserve
        .system_shared_memory_status(
            layerd::pb::inference::SystemSharedMemoryStatusRequest::default(),
        )
        .await
        .unwrap()
        .into_inner();
    assert!(status.regions.is_empty(), "{:?}", status.regions);
    let leftover: Vec<_> = std::fs::read_dir("/dev/shm")
        .unwrap()
        .filter_map(|e| e.ok())
        .filter(|e| e.file_name().to_string_lossy().starts_with("layerd-bench-"))
        .collect();
    assert!(leftover.is_empty(), "{leftover:?}");
    server.stop().await;
}
