use clap::Parser;

use kiln::cli::{Cli, Command};
use kiln::cmd::{
    agent, ask, bench, cache as cache_cmd, fit, mcp as mcp_cmd, monitor, runs as runs_cmd,
    sandbox as sandbox_cmd, sessions as session_cmd,
};
use kiln::error::{KilnError, EXIT_FAILURE};
use kiln::host::{daemon, launch, terminal as tui};
use kiln::{logging, models};

fn main() {
    // Before any file or thread exists, so everything kiln makes is private.
    kiln::private::restrict();
    let mut cli = Cli::parse();
    // A daemon a client started runs with that client's settings, whole.
    let daemon_settings = match &cli.command {
        Some(Command::Daemon {
            settings_stdin: true,
            ..
        }) => match daemon::settings_from_stdin() {
            Ok(settings) => {
                cli.common = settings.common.clone();
                Some(settings)
            }
            Err(e) => {
                eprintln!("kiln: {e}");
                std::process::exit(e.exit_code());
            }
        },
        _ => None,
    };
    logging::install_panic_hook();
    let paths = kiln::paths::Paths::resolve(cli.common.data_dir.as_deref());
    let unfixed = kiln::private::secure(&paths);
    let log_guard = logging::init(&paths.logs);
    for line in unfixed {
        tracing::warn!("{line}");
        eprintln!("kiln: warning: {line}");
    }

    let runtime = match tokio::runtime::Runtime::new() {
        Ok(rt) => rt,
        Err(e) => {
            eprintln!("kiln: cannot start the async runtime: {e}");
            std::process::exit(EXIT_FAILURE);
        }
    };
    let result = runtime.block_on(async {
        match cli.command {
            None => tui::run(&cli.common, tui::Start::Current).await,
            Some(Command::New) => tui::run(&cli.common, tui::Start::New).await,
            Some(Command::Ask(args)) => ask::run(args, &cli.common).await,
            Some(Command::Bench(args)) => bench::run(args, &cli.common).await,
            Some(Command::Models) => list_models(&cli.common),
            Some(Command::Fit(args)) => fit::run(args, &cli.common),
            Some(Command::Monitor(args)) => monitor::run(args).await,
            Some(Command::Sandbox { command }) => sandbox_cmd::run(&command, &cli.common).await,
            Some(Command::Resume { id, .. }) => tui::run(&cli.common, tui::Start::Resume(id)).await,
            Some(Command::Agent(args)) if args.detach => runs_cmd::detach(args, &cli.common).await,
            Some(Command::Agent(args)) => agent::run(args, &cli.common).await,
            Some(Command::Daemon {
                idle_exit,
                resume_on_start,
                ..
            }) => {
                let settings = daemon_settings
                    .unwrap_or_else(|| kiln::host::protocol::Settings::of(&cli.common));
                daemon::run(
                    settings,
                    idle_exit.map(std::time::Duration::from_secs),
                    resume_on_start,
                    None,
                )
                .await
            }
            Some(Command::Serve(args)) => {
                let settings = kiln::host::protocol::Settings::of(&cli.common);
                daemon::run(settings, None, false, Some(&args)).await
            }
            Some(Command::Ps) => runs_cmd::ps(&cli.common).await,
            Some(Command::Stop { id, daemon }) => {
                runs_cmd::stop(id.as_deref(), daemon, &cli.common).await
            }
            Some(Command::Attach { id }) => runs_cmd::attach(id, &cli.common).await,
            Some(Command::Sessions { action }) => session_cmd::run(action, &cli.common),
            Some(Command::Cache { action }) => cache_cmd::run(action, &cli.common),
            Some(Command::Mcp { action }) => mcp_cmd::run(action, &cli.common).await,
            Some(Command::Fetch { preset }) => fetch(preset.as_deref(), &cli.common).await,
        }
    });
    let code = match result {
        Ok(code) => code,
        Err(err) => {
            tracing::error!("{err}");
            eprintln!("kiln: {}", kiln::visible::visible(&err.to_string()));
            err.exit_code()
        }
    };
    // `exit` runs no destructors, so flush the log first. Exiting here also
    // spares waiting on kalosm's worker thread.
    drop(log_guard);
    std::process::exit(code);
}

fn list_models(common: &kiln::cli::Common) -> Result<i32, KilnError> {
    let (paths, _) = launch::paths_and_config(common)?;
    for p in models::PRESETS {
        let state = match models::cached_path(p, &paths) {
            Some(path) => format!("downloaded: {}", path.display()),
            None => "not downloaded".into(),
        };
        let default = if p.name == models::DEFAULT_PRESET {
            " (default)"
        } else {
            ""
        };
        println!(
            "{}{default}\n    {} · {:.1} GB · {state}",
            p.name,
            p.description,
            p.approx_bytes as f64 / 1e9
        );
    }
    Ok(0)
}

async fn fetch(preset: Option<&str>, common: &kiln::cli::Common) -> Result<i32, KilnError> {
    let (paths, _) = launch::paths_and_config(common)?;
    let name = preset.unwrap_or(models::DEFAULT_PRESET);
    let p = models::preset(name).ok_or_else(|| {
        let names: Vec<_> = models::PRESETS.iter().map(|p| p.name).collect();
        KilnError::BadArgument(format!(
            "unknown preset '{name}' (known: {})",
            names.join(", ")
        ))
    })?;
    let model = models::resolve(&models::ModelSpec::Preset(p.name), &paths).await?;
    println!("{}", model.path.display());
    Ok(0)
}
