//! `cloudpc`: one binary for the control-plane server (`cloudpc server`) and the admin command
//! line that talks to it over the REST API.

mod cli;
mod client;
mod commands;
mod host_agent;
mod output;
mod preflight;
mod server;

use std::process::ExitCode;

use clap::Parser;

fn main() -> ExitCode {
    let cli = cli::Cli::parse();
    let runtime = match tokio::runtime::Builder::new_multi_thread().enable_all().build() {
        Ok(rt) => rt,
        Err(e) => {
            eprintln!("error: cannot start the async runtime: {e}");
            return ExitCode::from(1);
        }
    };
    runtime.block_on(async move {
        match cli.command {
            cli::Command::Server(args) => server::run(*args).await,
            cli::Command::HostAgent(args) => host_agent::run(*args).await,
            command => commands::run(cli.global, command).await,
        }
    })
}
