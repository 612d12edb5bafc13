//! `kiln sandbox -- CMD ARGS…`: a command under exactly the sandbox the
//! agent's shell commands get, in the workspace, so a user (or a test) can
//! see what it allows before an unattended run.

use std::ffi::OsString;

use crate::agent::sandbox;
use crate::cli::Common;
use crate::error::{KilnError, Result};
use crate::host::launch::paths_and_config;

pub async fn run(command: &[OsString], common: &Common) -> Result<i32> {
    let (_, config) = paths_and_config(common)?;
    let policy = config.agent.sandbox();
    let root = common.workspace();
    let workspace = root
        .canonicalize()
        .map_err(|e| KilnError::BadArgument(format!("{}: {e}", root.display())))?;
    let (program, args) = command
        .split_first()
        .ok_or_else(|| KilnError::BadArgument("no command to run".into()))?;
    let program = program
        .to_str()
        .ok_or_else(|| KilnError::BadArgument("the command's name is not UTF-8".into()))?;
    let temp = tempfile::Builder::new()
        .prefix("kiln-call-")
        .tempdir()
        .map_err(|e| KilnError::io("a temporary folder", e))?;
    let args: Vec<&std::ffi::OsStr> = args.iter().map(OsString::as_os_str).collect();
    let refused = |why: String| KilnError::Io(sandbox::refusal(&why));
    let mut cmd =
        sandbox::command(&policy, &workspace, temp.path(), program, &args).map_err(refused)?;
    cmd.current_dir(&workspace);
    let status = match cmd.status().await {
        Ok(s) => s,
        Err(e) if policy.mode != sandbox::SandboxMode::Off => return Err(refused(e.to_string())),
        Err(e) => return Err(KilnError::io(program, e)),
    };
    Ok(status.code().unwrap_or(128 + 9))
}
