//! `distlock serve`: the HTTP lock service (the library is
//! `distlock-serve`; this is its command line).

use std::net::SocketAddr;
use std::path::PathBuf;
use std::process::ExitCode;
use std::time::Duration;

use clap::Parser;

/// Run the HTTP/JSON lock service in front of a backend.
#[derive(Parser, Debug)]
pub struct Args {
    /// The backend the service holds its locks in, e.g. redis://127.0.0.1:6379.
    #[arg(long, env = "DISTLOCK_URL")]
    backend: String,
    /// The address to listen on; loopback by default. Port 0 picks a free
    /// port (the address is printed on stdout).
    #[arg(long, default_value = distlock_serve::DEFAULT_LISTEN)]
    listen: SocketAddr,
    /// A file holding the bearer token every request must carry
    /// (`Authorization: Bearer <token>`); /healthz stays open.
    #[arg(long)]
    token_file: Option<PathBuf>,
    /// The longest server-side wait of an acquire.
    #[arg(long, default_value = "60s", value_parser = humantime::parse_duration)]
    max_wait: Duration,
    /// The longest lease TTL.
    #[arg(long, default_value = "1h", value_parser = humantime::parse_duration)]
    max_ttl: Duration,
}

pub fn main(args: Args) -> ExitCode {
    let token = match &args.token_file {
        None => None,
        Some(path) => match read_token(path) {
            Ok(token) => Some(token),
            Err(why) => {
                eprintln!("distlock serve: --token-file {}: {why}", path.display());
                return ExitCode::from(crate::EXIT_USAGE);
            }
        },
    };
    let mut config = distlock_serve::ServeConfig::new(args.backend);
    config.listen = args.listen;
    config.token = token;
    config.limits.max_wait = args.max_wait;
    config.limits.max_ttl = args.max_ttl;
    let runtime = match tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
    {
        Ok(runtime) => runtime,
        Err(err) => {
            eprintln!("distlock serve: cannot start the async runtime: {err}");
            return ExitCode::from(70);
        }
    };
    runtime.block_on(async move {
        let backend = distlock::error::redact_url(&config.backend_url);
        let server = match distlock_serve::Server::bind(config).await {
            Ok(server) => server,
            Err(err) => {
                eprintln!("distlock serve: {}", crate::describe(&err));
                return ExitCode::from(match &err {
                    distlock_serve::ServeError::Backend(err) => crate::exit_code_for(err),
                    _ => 69,
                });
            }
        };
        // Tests and scripts read this line to learn the port.
        println!(
            "distlock serve: listening on http://{} (backend {backend})",
            server.local_addr()
        );
        match server.run(shutdown_signal()).await {
            Ok(()) => ExitCode::SUCCESS,
            Err(err) => {
                eprintln!("distlock serve: {}", crate::describe(&err));
                ExitCode::from(69)
            }
        }
    })
}

/// The token: the file's first line, which must not be empty.
fn read_token(path: &std::path::Path) -> Result<String, String> {
    let text = std::fs::read_to_string(path).map_err(|err| err.to_string())?;
    let token = text.lines().next().unwrap_or("").trim().to_owned();
    if token.is_empty() {
        return Err("the file is empty".into());
    }
    Ok(token)
}

/// SIGINT or SIGTERM.
async fn shutdown_signal() {
    use tokio::signal::unix::{signal, SignalKind};
    match signal(SignalKind::terminate()) {
        Ok(mut terminate) => {
            tokio::select! {
                _ = tokio::signal::ctrl_c() => {}
                _ = terminate.recv() => {}
            }
        }
        Err(_) => {
            let _ = tokio::signal::ctrl_c().await;
        }
    }
}
