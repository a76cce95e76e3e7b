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
                    init_logging(node.log.format, &node.log.level);
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

fn init_logging(format: LogFormat, level: &str) {
    let filter = EnvFilter::try_from_default_env().unwrap_or_else(|_| EnvFilter::new(level));
    // Colours only on a terminal: journald and log files get plain text.
    let ansi = std::io::IsTerminal::is_terminal(&std::io::stderr());
    let builder = tracing_subscriber::fmt().with_env_filter(filter).with_writer(std::io::stderr).with_ansi(ansi);
    match format {
        LogFormat::Text => builder.init(),
        LogFormat::Json => builder.json().init(),
    }
}
