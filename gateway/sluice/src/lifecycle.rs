//! Process lifecycle behind a load balancer.
//!
//! SIGTERM: `/readyz` turns 503 at once, listeners keep accepting for `drainSeconds` so the balancer
//! notices, then Pingora stops accepting; in-flight requests get up to `shutdownTimeoutSeconds`, and
//! the process exits 0 as soon as none is left. SIGQUIT: graceful upgrade (the listening sockets go to
//! a new `sluice run --upgrade`), then the same wait. SIGINT: immediate exit.

use std::sync::Arc;
use std::time::Duration;

use async_trait::async_trait;
use log::info;
use pingora::server::{ExecutionPhase, ShutdownSignal, ShutdownSignalWatch};
use tokio::signal::unix::{signal, SignalKind};

use crate::state::Live;

/// How long no request may be in flight before an exiting process considers itself idle: covers a
/// connection accepted just before listeners closed whose request is still being read.
const IDLE_SETTLE: Duration = Duration::from_millis(200);

pub struct Signals {
    pub live: Arc<Live>,
}

#[async_trait]
impl ShutdownSignalWatch for Signals {
    async fn recv(&self) -> ShutdownSignal {
        let (Ok(mut term), Ok(mut int), Ok(mut quit)) = (
            signal(SignalKind::terminate()),
            signal(SignalKind::interrupt()),
            signal(SignalKind::quit()),
        ) else {
            log::error!("cannot install signal handlers; stopping");
            return ShutdownSignal::FastShutdown;
        };
        tokio::select! {
            _ = int.recv() => {
                info!("SIGINT: stopping now");
                ShutdownSignal::FastShutdown
            }
            _ = quit.recv() => {
                info!("SIGQUIT: handing the listening sockets to the new process");
                self.live.start_handover();
                ShutdownSignal::GracefulUpgrade
            }
            _ = term.recv() => {
                let drain = self.live.current().snapshot.settings.drain;
                self.live.start_draining();
                info!("SIGTERM: draining for {drain:?} (readyz is 503; still accepting)");
                tokio::select! {
                    _ = tokio::time::sleep(drain) => {}
                    _ = int.recv() => return ShutdownSignal::FastShutdown,
                }
                info!("drain over: closing listeners, finishing {} request(s) in flight", self.live.in_flight());
                ShutdownSignal::GracefulTerminate
            }
        }
    }
}

/// Follows Pingora's phases: marks the process serving once listeners are up, and once shutdown has
/// begun, exits as soon as nothing is in flight (Pingora would otherwise sleep its whole grace
/// period). Runs on its own thread because Pingora's runtimes are stopping by then.
pub fn watch_phases(live: Arc<Live>, mut phases: tokio::sync::broadcast::Receiver<ExecutionPhase>) {
    let spawned = std::thread::Builder::new()
        .name("sluice-lifecycle".into())
        .spawn(move || loop {
            match phases.blocking_recv() {
                Ok(ExecutionPhase::Running) => live.set_serving(),
                Ok(ExecutionPhase::ShutdownGracePeriod) => {
                    exit_when_idle(&live);
                    return;
                }
                Ok(_) => {}
                Err(tokio::sync::broadcast::error::RecvError::Lagged(_)) => {}
                Err(tokio::sync::broadcast::error::RecvError::Closed) => return,
            }
        });
    if let Err(e) = spawned {
        log::warn!("cannot start the lifecycle thread ({e}); shutdown waits the full grace period");
    }
}

fn exit_when_idle(live: &Live) {
    let mut idle_since: Option<std::time::Instant> = None;
    loop {
        if live.in_flight() == 0 {
            let since = *idle_since.get_or_insert_with(std::time::Instant::now);
            if since.elapsed() >= IDLE_SETTLE {
                info!("no request in flight: exiting");
                log::logger().flush();
                std::process::exit(0);
            }
        } else {
            idle_since = None;
        }
        std::thread::sleep(Duration::from_millis(10));
    }
}
