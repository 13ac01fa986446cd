//! `demo-upstream`: the library's service on `--listen`, stopped by SIGTERM (docker stop,
//! bench/run.sh) or Ctrl-C with a normal exit.

use std::net::SocketAddr;

use clap::Parser;

#[derive(Parser)]
#[command(about = "Demo upstream for keygate: /metrics and /headers")]
struct Args {
    #[arg(long, env = "DEMO_UPSTREAM_LISTEN", default_value = "127.0.0.1:8080")]
    listen: SocketAddr,
}

#[tokio::main]
async fn main() -> std::io::Result<()> {
    let args = Args::parse();
    let listener = tokio::net::TcpListener::bind(args.listen).await?;
    eprintln!("demo-upstream listening on {}", listener.local_addr()?);
    demo_upstream::serve(listener, stopped()).await
}

async fn stopped() {
    let mut terminate = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate())
        .expect("install a SIGTERM handler");
    tokio::select! {
        _ = tokio::signal::ctrl_c() => {}
        _ = terminate.recv() => {}
    }
}
