//! The shell tool's OS sandbox, by mode: where a command may write,
//! whether it reaches the network, what it may read, a background child
//! under the same policy, and a sandbox that cannot be set up refusing the
//! command rather than running it unsandboxed.

use std::sync::atomic::AtomicBool;

use kiln::agent::sandbox::{Sandbox, SandboxMode};
use kiln::agent::tools::{execute, Limits, ToolCall, Workspace};

struct Place {
    _dir: tempfile::TempDir,
    ws: Workspace,
    /// A folder outside the workspace, as $HOME would be.
    outside: std::path::PathBuf,
}

fn place() -> Place {
    let dir = tempfile::tempdir().unwrap();
    let root = dir.path().join("ws");
    std::fs::create_dir_all(root.join(".git")).unwrap();
    std::fs::write(root.join(".git/HEAD"), "ref: refs/heads/main\n").unwrap();
    std::fs::write(root.join("notes.txt"), "inside\n").unwrap();
    let outside = dir.path().join("home");
    std::fs::create_dir(&outside).unwrap();
    Place {
        ws: Workspace::new(&root).unwrap(),
        outside,
        _dir: dir,
    }
}

async fn sh(place: &Place, sandbox: Sandbox, command: &str) -> (bool, String) {
    let limits = Limits {
        sandbox,
        ..Limits::default()
    };
    let call = ToolCall::Shell {
        command: command.into(),
        edits: None,
    };
    let r = execute(&call, &place.ws, &limits, &AtomicBool::new(false)).await;
    let ok = r.ok && r.output.starts_with("exit code 0");
    (ok, r.output)
}

fn sandbox(mode: SandboxMode, network: bool) -> Sandbox {
    Sandbox { mode, network }
}

#[tokio::test]
async fn each_mode_writes_only_where_it_says() {
    let p = place();
    let home = p.outside.display().to_string();
    // A file in /tmp outside the call's own temporary folder.
    let stray = tempfile::Builder::new()
        .prefix("kiln-stray-")
        .tempdir()
        .unwrap();
    let stray = stray.path().join("x").display().to_string();
    for (mode, workspace, elsewhere) in [
        (SandboxMode::WorkspaceWrite, true, false),
        (SandboxMode::ReadOnly, false, false),
        (SandboxMode::Off, true, true),
    ] {
        let s = sandbox(mode, false);
        let (ok, out) = sh(&p, s, "echo a > made.txt").await;
        assert_eq!(ok, workspace, "{mode:?} workspace: {out}");
        let _ = std::fs::remove_file(p.ws.root().join("made.txt"));
        let (ok, out) = sh(&p, s, &format!("echo a > {home}/x")).await;
        assert_eq!(ok, elsewhere, "{mode:?} home: {out}");
        let (ok, out) = sh(&p, s, &format!("echo a > {stray}")).await;
        assert_eq!(ok, elsewhere, "{mode:?} /tmp: {out}");
        let (ok, out) = sh(&p, s, "echo evil >> .git/HEAD").await;
        assert_eq!(ok, elsewhere, "{mode:?} .git: {out}");
        // Its own temporary folder, reads of the system, and /dev/null.
        let (ok, out) = sh(&p, s, "echo t > \"$TMPDIR/t\" && cat \"$TMPDIR/t\"").await;
        assert!(ok, "{mode:?} TMPDIR: {out}");
        let (ok, out) = sh(
            &p,
            s,
            "cat /etc/passwd >/dev/null && ls /usr/bin >/dev/null",
        )
        .await;
        assert!(ok, "{mode:?} reads: {out}");
        // The caller's own ids, as before.
        let (ok, out) = sh(&p, s, "id -u").await;
        // SAFETY: getuid(2) cannot fail.
        let uid = unsafe { libc::getuid() };
        assert!(
            ok && out.contains(&format!("\n{uid}")),
            "{mode:?} id: {out}"
        );
    }
    assert_eq!(
        std::fs::read_to_string(p.ws.root().join(".git/HEAD")).unwrap(),
        "ref: refs/heads/main\nevil\n",
        "only the unsandboxed run wrote .git"
    );
}

#[tokio::test]
async fn the_network_is_off_unless_allowed() {
    let p = place();
    let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let port = listener.local_addr().unwrap().port();
    // bash's /dev/tcp, else python: a TCP connect to the test's listener.
    let connect = format!(
        "python3 -c 'import socket; socket.create_connection((\"127.0.0.1\", {port}), timeout=3)'"
    );
    for (s, reaches) in [
        (sandbox(SandboxMode::WorkspaceWrite, false), false),
        (sandbox(SandboxMode::ReadOnly, false), false),
        (sandbox(SandboxMode::WorkspaceWrite, true), true),
        (sandbox(SandboxMode::Off, false), true),
    ] {
        let (ok, out) = sh(&p, s, &connect).await;
        assert_eq!(ok, reaches, "{s:?}: {out}");
    }
}

/// A child left running in the background is under the same policy.
#[tokio::test]
async fn a_background_child_is_confined_too() {
    let p = place();
    let home = p.outside.display().to_string();
    let s = Sandbox::default();
    let (ok, out) = sh(
        &p,
        s,
        &format!("(sleep 0.2; echo a > {home}/late; echo b > late.txt) & wait"),
    )
    .await;
    assert!(ok, "{out}");
    assert!(!p.outside.join("late").exists());
    assert!(p.ws.root().join("late.txt").exists());
}

/// `kiln sandbox` in the workspace, with these flags.
fn kiln_sandbox(
    place: &Place,
    home: &std::path::Path,
    wrap: &[&str],
    flags: &[&str],
    command: &str,
) -> std::process::Output {
    let kiln = env!("CARGO_BIN_EXE_kiln");
    let mut args: Vec<String> = wrap.iter().map(|s| s.to_string()).collect();
    args.extend([kiln.to_string(), "sandbox".into(), "--workspace".into()]);
    args.push(place.ws.root().display().to_string());
    args.extend(flags.iter().map(|s| s.to_string()));
    args.extend(["--".into(), "sh".into(), "-c".into(), command.into()]);
    std::process::Command::new(&args[0])
        .args(&args[1..])
        .env("KILN_HOME", home)
        .output()
        .unwrap()
}

/// `kiln sandbox` runs a command under exactly the agent shell's policy:
/// the same commands succeed and fail the same way, for each mode.
#[tokio::test]
async fn kiln_sandbox_and_the_shell_tool_agree() {
    let p = place();
    let home = tempfile::tempdir().unwrap();
    let outside = p.outside.display().to_string();
    let commands = [
        "echo a > made.txt".to_string(),
        format!("echo a > {outside}/x"),
        "echo evil >> .git/HEAD".to_string(),
        "echo t > \"$TMPDIR/t\"".to_string(),
        "cat /etc/hostname /etc/passwd >/dev/null".to_string(),
    ];
    for (mode, flag) in [
        (SandboxMode::WorkspaceWrite, "workspace-write"),
        (SandboxMode::ReadOnly, "read-only"),
    ] {
        for command in &commands {
            let (tool, out) = sh(&p, sandbox(mode, false), command).await;
            let cli = kiln_sandbox(&p, home.path(), &[], &["--sandbox", flag], command);
            assert_eq!(
                tool,
                cli.status.success(),
                "{mode:?} {command}: tool {out}; kiln sandbox {}",
                String::from_utf8_lossy(&cli.stderr)
            );
            let _ = std::fs::remove_file(p.ws.root().join("made.txt"));
        }
    }
}

/// Where kiln runs in a user namespace that may make no more of them (as
/// in a container).
const NO_NAMESPACES: [&str; 6] = [
    "unshare",
    "--user",
    "--map-root-user",
    "sh",
    "-c",
    "echo 0 > /proc/sys/user/max_user_namespaces && exec \"$0\" \"$@\"",
];

/// A sandbox that cannot be set up refuses the command in one line that
/// says how to opt out, and never runs it unsandboxed: without namespaces
/// the workspace's `.git` cannot be kept read-only.
#[tokio::test]
async fn a_sandbox_that_cannot_be_set_up_refuses_the_command() {
    let p = place();
    let home = tempfile::tempdir().unwrap();
    let no_namespaces = NO_NAMESPACES;
    let out = kiln_sandbox(&p, home.path(), &no_namespaces, &[], "touch ran.txt");
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success(), "{stderr}");
    assert!(stderr.contains("--sandbox off"), "{stderr}");
    assert!(stderr.contains(".git cannot be kept read-only"), "{stderr}");
    assert_eq!(stderr.trim().lines().count(), 1, "{stderr}");
    assert!(!p.ws.root().join("ran.txt").exists(), "not run unsandboxed");
    // With the sandbox off it runs: the refusal was the sandbox's.
    let out = kiln_sandbox(
        &p,
        home.path(),
        &no_namespaces,
        &["--sandbox", "off"],
        "touch ran.txt",
    );
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(p.ws.root().join("ran.txt").exists());
}

/// Without namespaces, a workspace with no `.git` still gets the whole
/// policy: Landlock for writes, and a seccomp filter for the network (a
/// TCP connect to the test's listener fails; a Unix socket still works).
#[tokio::test]
async fn without_namespaces_seccomp_keeps_the_network_off() {
    let p = place();
    std::fs::remove_dir_all(p.ws.root().join(".git")).unwrap();
    let home = tempfile::tempdir().unwrap();
    let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let port = listener.local_addr().unwrap().port();
    let connect = format!(
        "python3 -c 'import socket; socket.create_connection((\"127.0.0.1\", {port}), timeout=3)'"
    );
    let unix = "python3 -c 'import socket; socket.socket(socket.AF_UNIX).close()'";
    let outside = p.outside.display().to_string();
    for (command, runs) in [
        ("touch ran.txt", true),
        (unix, true),
        (connect.as_str(), false),
        (&format!("touch {outside}/x"), false),
    ] {
        let out = kiln_sandbox(&p, home.path(), &NO_NAMESPACES, &[], command);
        assert_eq!(
            out.status.success(),
            runs,
            "{command}: {}",
            String::from_utf8_lossy(&out.stderr)
        );
    }
    assert!(p.ws.root().join("ran.txt").exists());
    // With the network allowed, no filter: the same connect goes through.
    let out = kiln_sandbox(
        &p,
        home.path(),
        &NO_NAMESPACES,
        &["--sandbox-network"],
        &connect,
    );
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
}
