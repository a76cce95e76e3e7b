//! `lbnode`: one node of a raftlb cluster, or `lbnode demo`, a 3-node cluster
//! on loopback to try lbctl against.

mod admin;
mod alloc;
mod balance;
mod config;
mod daemon;
mod dataplane;
mod demo;
mod health;
mod monitor;
mod stats;
mod stick_sync;
mod vip;

use std::process::ExitCode;

use clap::{Parser, Subcommand};
use config::{LogFormat, Overrides};
use tracing_subscriber::EnvFilter;

/// mimalloc: the data plane allocates and frees small objects on two threads
/// for every request, where it beats the system allocator.
#[global_allocator]
static ALLOCATOR: alloc::Allocator = alloc::Allocator;

#[derive(Parser)]
#[command(name = "lbnode", version, about = "A raftlb node: load balancer with Raft-replicated config, health and VIP")]
struct Cli {
    #[command(subcommand)]
    command: Option<Sub>,
    #[command(flatten)]
    node: Overrides,
}

#[derive(Subcommand)]
enum Sub {
    /// Start a 3-node cluster on loopback with a sample spec (no root needed).
    Demo(demo::DemoArgs),
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    let result = tokio::runtime::Builder::new_multi_thread().enable_all().build().map_err(anyhow::Error::from).and_then(|rt| {
        rt.block_on(async {
            match cli.command {
                Some(Sub::Demo(args)) => demo::run(args).await,
                None => {
                    let node = cli.node.resolve()?;
                    init_logging(node.log.format, log_filter(std::env::var("RUST_LOG").ok(), &node.log.level)?);
                    daemon::run(node).await
                }
            }
        })
    });
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("lbnode: {e:#}");
            ExitCode::FAILURE
        }
    }
}

/// The log filter: `RUST_LOG` when set, else `log.level`. A directive that
/// does not parse is refused, not skipped.
fn log_filter(rust_log: Option<String>, level: &str) -> anyhow::Result<EnvFilter> {
    let (source, filter) = match rust_log {
        Some(env) => ("RUST_LOG", env),
        None => ("log.level", level.to_owned()),
    };
    EnvFilter::builder().parse(&filter).map_err(|e| {
        anyhow::anyhow!("{source} {filter:?} is not a log filter: {e}: write levels and targets like \"info\" or \"info,openraft=debug\"")
    })
}

fn init_logging(format: LogFormat, filter: EnvFilter) {
    // Colours only on a terminal: journald and log files get plain text.
    let ansi = std::io::IsTerminal::is_terminal(&std::io::stderr());
    let builder = tracing_subscriber::fmt().with_env_filter(filter).with_writer(std::io::stderr).with_ansi(ansi);
    match format {
        LogFormat::Text => builder.init(),
        LogFormat::Json => builder.json().init(),
    }
}

#[cfg(test)]
mod tests {
    use super::log_filter;

    #[test]
    fn a_log_filter_that_does_not_parse_is_refused_with_where_it_came_from() {
        assert!(log_filter(None, "info,openraft=off").is_ok());
        assert!(log_filter(Some("debug".into()), "nonsense[").is_ok(), "RUST_LOG wins over log.level");
        let err = log_filter(None, "info,=x").unwrap_err().to_string();
        assert!(err.starts_with("log.level \"info,=x\" is not a log filter: "), "{err}");
        let err = log_filter(Some("x[".into()), "info").unwrap_err().to_string();
        assert!(err.starts_with("RUST_LOG \"x[\" is not a log filter: "), "{err}");
    }
}
