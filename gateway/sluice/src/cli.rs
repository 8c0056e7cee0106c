//! The command line: `sluice run | validate | demo | echo`.

use std::path::PathBuf;
use std::process::ExitCode;

use anyhow::Context;
use clap::{Parser, Subcommand};
use sluice_core::snapshot::{summary, Snapshot};
use sluice_core::{LoadCache, Loaded};

#[derive(Parser, Debug)]
#[command(
    name = "sluice",
    version,
    about = "An edge gateway configured with Istio's Gateway, VirtualService, DestinationRule and \
             ServiceEntry objects.",
    after_help = "Start with `sluice demo`, then `sluice validate --config configs/` on your own files.\n\
                  Logs go to stderr; set RUST_LOG=debug for more."
)]
pub struct Cli {
    #[command(subcommand)]
    pub command: Command,
}

#[derive(Subcommand, Debug)]
pub enum Command {
    /// Serve traffic with the config in the given files or directories.
    Run {
        /// A YAML file, or a directory of *.yaml/*.yml files. Repeat for several. Edits are
        /// picked up automatically (and on SIGHUP); a config with errors is never applied.
        #[arg(short, long = "config", value_name = "PATH", default_value = "configs")]
        configs: Vec<PathBuf>,
        /// Take the listening sockets over from a running Sluice: start this, then send the old
        /// process SIGQUIT. No connection is refused during the switch.
        #[arg(long)]
        upgrade: bool,
    },
    /// Check config and print every problem as file:line:col: message (exit 1 on errors).
    Validate {
        #[arg(short, long = "config", value_name = "PATH", default_value = "configs")]
        configs: Vec<PathBuf>,
    },
    /// Run a built-in demo: two echo backends (v1, v2) behind a 90/10 canary split.
    Demo {
        /// Port the demo gateway listens on (127.0.0.1).
        #[arg(long, default_value_t = crate::demo::DEFAULT_PORT)]
        port: u16,
    },
    /// Run an echo backend that answers with its name and the request it saw, as JSON.
    Echo {
        /// Name the backend reports (in the body and the x-backend header).
        #[arg(long)]
        name: String,
        /// Address to listen on.
        #[arg(long, default_value = "127.0.0.1:9000")]
        listen: std::net::SocketAddr,
    },
}

pub fn main() -> ExitCode {
    let cli = Cli::parse();
    env_logger::Builder::from_env(env_logger::Env::default().default_filter_or("info")).init();
    let result = match cli.command {
        Command::Validate { configs } => Ok(validate(&configs)),
        Command::Run { configs, upgrade } => run(&configs, upgrade),
        Command::Demo { port } => demo(port),
        Command::Echo { name, listen } => echo(name, listen),
    };
    match result {
        Ok(code) => code,
        Err(e) => {
            eprintln!("sluice: {e:#}");
            ExitCode::FAILURE
        }
    }
}

/// Prints every diagnostic (to stdout for `validate`, whose output they are; to stderr otherwise)
/// and compiles the snapshot (`None` when there were errors).
fn report(loaded: &Loaded, to_stdout: bool, cache: &mut LoadCache) -> Option<Snapshot> {
    for diagnostic in loaded.diagnostics.clone().into_sorted() {
        if to_stdout {
            println!("{diagnostic}");
        } else {
            eprintln!("{diagnostic}");
        }
    }
    loaded.snapshot_cached(cache)
}

fn validate(configs: &[PathBuf]) -> ExitCode {
    let loaded = sluice_core::load_paths(configs);
    let errors = loaded.diagnostics.errors().count();
    let warnings = loaded.diagnostics.warnings().count();
    let snapshot = report(&loaded, true, &mut LoadCache::default());
    // Certificates are checked too: a file that is missing, expired or does not match its key fails
    // validation just as it would fail a reload.
    let certificate_errors = snapshot
        .as_ref()
        .and_then(|s| crate::tls::TlsListeners::build(s).err())
        .unwrap_or_default();
    for error in &certificate_errors {
        println!("{error}");
    }
    match snapshot.filter(|_| certificate_errors.is_empty()) {
        Some(snapshot) => {
            println!(
                "OK: {} file(s), {} warning(s); {}",
                loaded.model.as_ref().map_or(0, |m| m.files.len()),
                warnings,
                summary(&snapshot)
            );
            ExitCode::SUCCESS
        }
        None => {
            let errors = errors + certificate_errors.len();
            println!("invalid: {errors} error(s), {warnings} warning(s)");
            ExitCode::FAILURE
        }
    }
}

fn serve(startup: crate::server::Startup) -> anyhow::Result<ExitCode> {
    log::info!("config: {}", summary(&startup.snapshot));
    crate::server::run(startup)?;
    Ok(ExitCode::SUCCESS)
}

fn run(configs: &[PathBuf], upgrade: bool) -> anyhow::Result<ExitCode> {
    let mut cache = LoadCache::default();
    let loaded = sluice_core::load_paths_cached(configs, &mut cache);
    let Some(snapshot) = report(&loaded, false, &mut cache) else {
        eprintln!(
            "sluice: config has {} error(s); nothing started",
            loaded.diagnostics.errors().count()
        );
        return Ok(ExitCode::FAILURE);
    };
    let startup = crate::server::Startup {
        snapshot,
        paths: configs.to_vec(),
        files: loaded.files.clone(),
        fingerprint: loaded.fingerprint,
        cache,
        upgrade,
    };
    // Not kept while serving: once a reload validates the VirtualServices anew, this first
    // model would hold the old ones (tens of MB at 10,000 hosts) for the life of the process.
    drop(loaded);
    serve(startup)
}

fn demo(port: u16) -> anyhow::Result<ExitCode> {
    let text = crate::demo::start_backends(port)?;
    let loaded = sluice_core::load_str("<built-in demo>", &text);
    let snapshot = report(&loaded, false, &mut LoadCache::default())
        .context("the built-in demo config did not validate")?;
    println!("Sluice demo: a 90/10 canary split between two built-in backends, v1 and v2.");
    println!("  Gateway:  http://127.0.0.1:{port}/");
    println!("  Try:      for i in $(seq 20); do curl -s http://127.0.0.1:{port}/ | grep -o '\"backend\":\"v[12]\"'; done | sort | uniq -c");
    println!("  Stop:     Ctrl-C");
    serve(crate::server::Startup {
        snapshot,
        paths: Vec::new(),
        files: Vec::new(),
        fingerprint: loaded.fingerprint,
        cache: LoadCache::default(),
        upgrade: false,
    })
}

fn echo(name: String, listen: std::net::SocketAddr) -> anyhow::Result<ExitCode> {
    let runtime = tokio::runtime::Runtime::new()?;
    runtime.block_on(async move {
        let bound = crate::echo::start(&name, listen).await?;
        println!("echo backend {name} listening on http://{bound}/");
        tokio::signal::ctrl_c().await?;
        Ok::<_, anyhow::Error>(ExitCode::SUCCESS)
    })
}
