//! Process signals that start a graceful shutdown.

use std::future::Future;

/// Completes on the first SIGTERM (what Kubernetes and container engines
/// send) or SIGINT (Ctrl-C).
///
/// The handlers are installed when this is called, not when the future is
/// first polled: the server calls it before it binds its port, so a signal
/// sent as soon as the port answers (a test, an orchestrator) starts a
/// graceful shutdown instead of killing the process by the default action.
pub fn terminate() -> impl Future<Output = ()> {
    #[cfg(unix)]
    {
        use tokio::signal::unix::{signal, SignalKind};
        let mut term = signal(SignalKind::terminate()).expect("SIGTERM handler can be installed");
        let mut interrupt =
            signal(SignalKind::interrupt()).expect("SIGINT handler can be installed");
        async move {
            tokio::select! {
                _ = term.recv() => tracing::info!("SIGTERM received"),
                _ = interrupt.recv() => tracing::info!("SIGINT received"),
            }
        }
    }
    #[cfg(not(unix))]
    {
        async {
            let _ = tokio::signal::ctrl_c().await;
            tracing::info!("Ctrl-C received");
        }
    }
}
