//! `lbnode demo`: starts three nodes of this same binary on loopback, forms a
//! cluster of them, applies a sample spec whose two backends the demo serves
//! itself, prints what to try with curl and lbctl, and stops them all on
//! Ctrl-C or SIGTERM. Needs no root and no file. Node N serves the frontend
//! on 127.0.0.N (its bind rewrite), since three nodes cannot share one address.

use std::net::{Ipv4Addr, SocketAddr, TcpListener};
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use anyhow::{bail, Context};
use nix::sys::prctl::set_pdeathsig;
use nix::sys::signal::{kill, Signal};
use nix::unistd::Pid;
use raftlb_proto::admin::{ClusterInitRequest, ConfigApplyRequest, IdentityRequest, NodeAddRequest};
use tokio::process::{Child, Command};
use tokio::signal::unix::{signal, SignalKind};

use crate::admin::connect;

const DEMO_SPEC: &str = include_str!("demo-spec.yaml");
const NODES: u16 = 3;

#[derive(Debug, clap::Args)]
pub struct DemoArgs {
    /// gRPC port of node 1; nodes 2 and 3 take the next two. Monitor ports are
    /// these plus 100, the frontend port is this plus 1079 (8080), the two
    /// backends this plus 2000 and 2001 (9001, 9002).
    #[arg(long, default_value_t = 7001)]
    base_port: u16,
    /// Keep the nodes' data and logs here instead of a temporary directory.
    #[arg(long, value_name = "DIR")]
    dir: Option<PathBuf>,
}

struct DemoNode {
    id: u64,
    addr: SocketAddr,
    monitor: SocketAddr,
    log: PathBuf,
    child: Child,
}

pub async fn run(args: DemoArgs) -> anyhow::Result<()> {
    let base = args.base_port;
    if base == 0 || base.checked_add(2001).is_none() {
        bail!("--base-port {base} is out of range: the demo uses it and the 2001 ports above it; give 1 to {}", u16::MAX - 2001);
    }
    let (front, web1, web2) = (base + 1079, base + 2000, base + 2001);
    for (name, port) in [("web1", web1), ("web2", web2)] {
        let addr = SocketAddr::from((Ipv4Addr::LOCALHOST, port));
        let listener = tokio::net::TcpListener::bind(addr)
            .await
            .with_context(|| format!("port {port} is taken: pass --base-port to use other ports"))?;
        tokio::spawn(serve_backend(listener, name));
    }
    let spec = DEMO_SPEC.replace("{front}", &front.to_string()).replace("{web1}", &web1.to_string()).replace("{web2}", &web2.to_string());
    let temp;
    let dir = match &args.dir {
        Some(d) => {
            std::fs::create_dir_all(d).with_context(|| format!("cannot create {}", d.display()))?;
            d.clone()
        }
        None => {
            temp = tempfile::Builder::new().prefix("raftlb-demo-").tempdir().context("cannot create a temporary directory")?;
            temp.path().to_path_buf()
        }
    };
    let exe = std::env::current_exe().context("cannot find the lbnode binary")?;

    let mut nodes = Vec::new();
    for i in 0..NODES {
        let addr = SocketAddr::from((Ipv4Addr::LOCALHOST, args.base_port + i));
        let monitor = SocketAddr::from((Ipv4Addr::LOCALHOST, args.base_port + i + 100));
        let frontend = SocketAddr::from(([127, 0, 0, i as u8 + 1], front));
        for a in [addr, monitor, frontend] {
            TcpListener::bind(a).with_context(|| format!("port {} is taken: pass --base-port to use other ports", a.port()))?;
        }
        nodes.push(spawn(&exe, &dir, u64::from(i) + 1, addr, monitor)?);
    }

    let result = form_cluster(&mut nodes, &spec).await;
    if let Err(e) = result {
        stop(&mut nodes).await;
        return Err(e);
    }
    print_guide(&nodes, &exe, &dir, args.dir.is_none(), front);

    let mut term = signal(SignalKind::terminate()).context("cannot watch for SIGTERM")?;
    tokio::select! {
        r = tokio::signal::ctrl_c() => r.context("cannot wait for Ctrl-C")?,
        _ = term.recv() => {}
    }
    println!("\nstopping the demo nodes");
    stop(&mut nodes).await;
    Ok(())
}

fn spawn(exe: &Path, dir: &Path, id: u64, addr: SocketAddr, monitor: SocketAddr) -> anyhow::Result<DemoNode> {
    let log = dir.join(format!("node{id}.log"));
    let out = std::fs::File::create(&log).with_context(|| format!("cannot create {}", log.display()))?;
    let mut cmd = Command::new(exe);
    // SAFETY: prctl(PR_SET_PDEATHSIG) is a single async-signal-safe system
    // call. It stops a node when the demo dies, even by SIGKILL.
    unsafe {
        cmd.pre_exec(|| set_pdeathsig(Signal::SIGTERM).map_err(std::io::Error::from));
    }
    let child = cmd
        .args(["--id", &id.to_string(), "--listen", &addr.to_string(), "--monitor", &monitor.to_string()])
        .args(["--bind-rewrite", &format!("127.0.0.1=127.0.0.{id}")])
        // Ctrl-C should not wait long for a browser's kept-alive connections.
        .args(["--stop-grace", "1s"])
        .arg("--data-dir")
        .arg(dir.join(format!("node{id}")))
        .stdout(out.try_clone()?)
        .stderr(out)
        .kill_on_drop(true)
        .spawn()
        .with_context(|| format!("cannot start {}", exe.display()))?;
    Ok(DemoNode { id, addr, monitor, log, child })
}

/// Waits for every node to answer, then: init on node 1, add 2 and 3, apply the spec.
async fn form_cluster(nodes: &mut [DemoNode], spec: &str) -> anyhow::Result<()> {
    for node in nodes.iter_mut() {
        wait_until_up(node).await?;
    }
    let mut admin = connect(&nodes[0].addr.to_string()).await?;
    admin.cluster_init(ClusterInitRequest {}).await.map_err(|s| anyhow::anyhow!("cluster init: {}", s.message()))?;
    for node in &nodes[1..] {
        let req = NodeAddRequest { id: node.id, addr: node.addr.to_string() };
        admin.node_add(req).await.map_err(|s| anyhow::anyhow!("node add {}: {}", node.id, s.message()))?;
    }
    let req = ConfigApplyRequest { spec_yaml: spec.to_owned(), dry_run: false };
    admin.config_apply(req).await.map_err(|s| anyhow::anyhow!("config apply: {}", s.message()))?;
    Ok(())
}

async fn wait_until_up(node: &mut DemoNode) -> anyhow::Result<()> {
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        if let Some(status) = node.child.try_wait()? {
            let log = std::fs::read_to_string(&node.log).unwrap_or_default();
            bail!("node {} exited ({status}) at start:\n{log}", node.id);
        }
        if let Ok(mut c) = connect(&node.addr.to_string()).await {
            if c.identity(IdentityRequest {}).await.is_ok() {
                return Ok(());
            }
        }
        if Instant::now() > deadline {
            bail!("node {} did not answer at {} within 10 s; see {}", node.id, node.addr, node.log.display());
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

/// SIGTERM to every node, so each stops cleanly; SIGKILL after 5 s.
async fn stop(nodes: &mut [DemoNode]) {
    for node in nodes.iter() {
        if let Some(pid) = node.child.id() {
            let _ = kill(Pid::from_raw(pid as i32), Signal::SIGTERM);
        }
    }
    for node in nodes.iter_mut() {
        if tokio::time::timeout(Duration::from_secs(5), node.child.wait()).await.is_err() {
            let _ = node.child.kill().await;
        }
    }
}

fn print_guide(nodes: &[DemoNode], exe: &Path, dir: &Path, temporary: bool, front: u16) {
    let lbctl = exe.with_file_name("lbctl");
    let lbctl = if lbctl.exists() { lbctl.display().to_string() } else { "lbctl".to_owned() };
    println!("raftlb demo: a 3-node cluster on loopback, spec version 1 applied\n");
    println!("  {:<5} {:<16} {:<16} {:<8} log", "node", "grpc (admin)", "monitor", "pid");
    for n in nodes {
        let pid = n.child.id().map_or("-".to_owned(), |p| p.to_string());
        println!("  {:<5} {:<16} {:<16} {:<8} {}", n.id, n.addr, n.monitor, pid, n.log.display());
    }
    let first = nodes[0].addr;
    let second = nodes[1].addr;
    println!("\nTraffic: every node serves the frontend on its own address, to backends web1 and web2:");
    for n in nodes {
        println!("  curl -si http://127.0.0.{}:{front}/", n.id);
    }
    println!(
        "\nTry, in another shell:
  export LBCTL_ENDPOINT={first}
  {lbctl} cluster status                 # leader, term, config version, members
  {lbctl} config get                     # the spec in force
  {lbctl} config get > spec.yaml         # edit it (add a server), then:
  {lbctl} config diff -f spec.yaml
  {lbctl} config apply -f spec.yaml      # a new version, on every node
  {lbctl} config history
  {lbctl} config rollback 1              # version 1's spec, as a new version
  {lbctl} health                         # each server: the committed view, each node's checks
  {lbctl} server disable web/web1        # maintenance on every node; `server enable` undoes it
  curl -s http://{}/healthz            # and /stats for the traffic counters

Kill the leader (kill -9 PID from the table) and ask another node:
  {lbctl} --endpoint {second} cluster status

Ctrl-C stops the demo{}.",
        nodes[0].monitor,
        if temporary { " and removes its data".to_owned() } else { format!("; data and logs stay in {}", dir.display()) }
    );
}

/// One of the demo's backends: answers every request with its name and what
/// the balancer told it about the client.
async fn serve_backend(listener: tokio::net::TcpListener, name: &'static str) {
    loop {
        let Ok((stream, _)) = listener.accept().await else { continue };
        tokio::spawn(async move {
            let service = hyper::service::service_fn(move |req: hyper::Request<hyper::body::Incoming>| async move {
                let header = |h: &str| req.headers().get(h).and_then(|v| v.to_str().ok()).unwrap_or("-").to_owned();
                let body = format!(
                    "hello from {name}: {} {}\nX-Forwarded-For: {}\nX-Served-By: {}\n",
                    req.method(),
                    req.uri().path(),
                    header("x-forwarded-for"),
                    header("x-served-by")
                );
                Ok::<_, std::convert::Infallible>(hyper::Response::new(http_body_util::Full::new(hyper::body::Bytes::from(body))))
            });
            let _ = hyper::server::conn::http1::Builder::new().serve_connection(hyper_util::rt::TokioIo::new(stream), service).await;
        });
    }
}
