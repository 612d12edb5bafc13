//! The OS sandbox the agent's shell commands run under, and `kiln sandbox`,
//! which runs any command under the same policy. The file tools confine
//! paths; this confines processes: what `sh -c` and everything it starts
//! may write, and whether it reaches the network.
//!
//! Linux: Landlock (read everywhere; write only in the workspace, the
//! call's own temporary folder and `/dev/null`), in a user namespace of
//! the caller's own ids with a network namespace of its own (no network:
//! not even loopback) and a mount namespace where the workspace's `.git`
//! is bound read-only. Where namespaces are not allowed (a container, a
//! hardened kernel) the network goes off by a seccomp filter instead
//! (sockets for AF_UNIX only), and a workspace with a `.git`, which only a
//! mount namespace keeps read-only, is refused. It is applied in the child
//! between fork and exec,
//! so kiln itself is never restricted; what can be made before the fork
//! (the Landlock ruleset, the id maps, the mount flags) is, so the child
//! only makes system calls. macOS: `sandbox-exec` with a profile of the
//! same policy. It fails closed: a sandbox that cannot be set up refuses
//! the command in one line naming the way out (`--sandbox off`).

use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};

/// What sandboxed commands may write.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize, clap::ValueEnum)]
#[serde(rename_all = "kebab-case")]
pub enum SandboxMode {
    /// The workspace (but its `.git`) and a temporary folder of the call's.
    #[default]
    WorkspaceWrite,
    /// Nothing but the call's temporary folder.
    ReadOnly,
    /// No sandbox: commands run with all the user's rights.
    Off,
}

/// The sandbox for an agent's shell commands.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Sandbox {
    pub mode: SandboxMode,
    /// Let commands reach the network.
    pub network: bool,
}

impl Sandbox {
    /// The policy in a word or two, for the status bar.
    pub fn short(&self) -> &'static str {
        match (self.mode, self.network) {
            (SandboxMode::Off, _) => "no sandbox",
            (SandboxMode::WorkspaceWrite, false) => "sandboxed",
            (SandboxMode::WorkspaceWrite, true) => "sandboxed, network",
            (SandboxMode::ReadOnly, false) => "read-only sandbox",
            (SandboxMode::ReadOnly, true) => "read-only sandbox, network",
        }
    }

    /// The policy in a few words, for approvals and progress lines.
    pub fn describe(&self) -> String {
        let mode = match self.mode {
            SandboxMode::WorkspaceWrite => "sandbox: writes in the workspace only",
            SandboxMode::ReadOnly => "sandbox: read-only",
            SandboxMode::Off => return "no sandbox: all your rights".into(),
        };
        let net = if self.network {
            "network on"
        } else {
            "no network"
        };
        format!("{mode}, {net}")
    }
}

/// Why a sandbox could not be set up, in one line with the way out.
pub fn refusal(why: &str) -> String {
    format!(
        "the shell sandbox cannot be set up here ({why}); the command was not run. `--sandbox off` (or `sandbox = \"off\"` under [agent]) runs commands with all your rights"
    )
}

/// `program` with `args`, to run in `workspace` under `sandbox`, with
/// `temp` as its writable temporary folder (`TMPDIR`). Errors say why in
/// words (see `refusal`).
pub fn command(
    sandbox: &Sandbox,
    workspace: &Path,
    temp: &Path,
    program: &str,
    args: &[&std::ffi::OsStr],
) -> Result<tokio::process::Command, String> {
    if sandbox.mode == SandboxMode::Off {
        let mut cmd = tokio::process::Command::new(program);
        cmd.args(args);
        return Ok(cmd);
    }
    // Rules name real paths (macOS's temporary folders are under a link,
    // /var to /private/var).
    let temp = temp.canonicalize().unwrap_or_else(|_| temp.to_path_buf());
    let workspace = workspace
        .canonicalize()
        .unwrap_or_else(|_| workspace.to_path_buf());
    let mut cmd = platform::command(
        &Confinement {
            sandbox: *sandbox,
            workspace,
            temp: temp.clone(),
        },
        program,
        args,
    )?;
    cmd.env("TMPDIR", &temp);
    Ok(cmd)
}

/// A sandboxed command's policy and the real paths it names: the
/// workspace it runs in and its temporary folder.
pub struct Confinement {
    pub sandbox: Sandbox,
    pub workspace: PathBuf,
    pub temp: PathBuf,
}

impl Confinement {
    /// The folders a sandboxed command may write.
    fn writable(&self) -> Vec<&Path> {
        let mut paths = vec![self.temp.as_path()];
        if self.sandbox.mode == SandboxMode::WorkspaceWrite {
            paths.push(&self.workspace);
        }
        paths
    }
}

#[cfg(target_os = "linux")]
mod platform {
    use std::ffi::CString;
    use std::os::unix::ffi::OsStrExt;
    use std::path::Path;
    use std::sync::Mutex;

    use landlock::{
        path_beneath_rules, Access, AccessFs, CompatLevel, Compatible, Ruleset, RulesetAttr,
        RulesetCreated, RulesetCreatedAttr, ABI,
    };

    use super::{Confinement, SandboxMode};

    /// What the child does between fork and exec, all made beforehand.
    struct Plan {
        ruleset: Mutex<Option<RulesetCreated>>,
        /// New user namespace, and with it a network one (no network)
        /// and a mount one (`.git` read-only); none when neither is needed.
        namespaces: libc::c_int,
        maps: [(CString, Vec<u8>); 3],
        /// The workspace's `.git`, and the flags its mount must keep.
        git: Option<(CString, libc::c_ulong)>,
        /// No network by a seccomp filter, where namespaces are not
        /// allowed.
        no_network: Option<Vec<libc::sock_filter>>,
    }

    pub fn command(
        place: &Confinement,
        program: &str,
        args: &[&std::ffi::OsStr],
    ) -> Result<tokio::process::Command, String> {
        let (sandbox, workspace) = (&place.sandbox, &place.workspace);
        let ruleset = ruleset(place).map_err(|e| format!("Landlock: {e}"))?;
        let git = workspace.join(".git");
        let git = match sandbox.mode == SandboxMode::WorkspaceWrite && git.exists() {
            true => Some((cstring(&git)?, mount_flags(&git)?)),
            false => None,
        };
        let mut namespaces = 0;
        if !sandbox.network {
            namespaces |= libc::CLONE_NEWUSER | libc::CLONE_NEWNET;
        }
        if git.is_some() {
            namespaces |= libc::CLONE_NEWUSER | libc::CLONE_NEWNS;
        }
        // Where namespaces are not allowed (a container, a hardened
        // kernel), the network goes off by a seccomp filter instead; there
        // is no such way to keep `.git` read-only.
        let mut no_network = None;
        if namespaces != 0 && !namespaces_allowed() {
            if git.is_some() {
                return Err(
                    "namespaces are not allowed here, and without a mount namespace the workspace's .git cannot be kept read-only".into(),
                );
            }
            no_network = Some(no_network_filter().ok_or(
                "namespaces are not allowed here, and kiln has no seccomp filter for this architecture",
            )?);
            namespaces = 0;
        }
        // SAFETY: getuid(2) and getgid(2) cannot fail.
        let (uid, gid) = unsafe { (libc::getuid(), libc::getgid()) };
        let map = |p: &str, v: String| (CString::new(p).expect("no NUL"), v.into_bytes());
        let plan = Plan {
            ruleset: Mutex::new(Some(ruleset)),
            namespaces,
            maps: [
                map("/proc/self/setgroups", "deny".into()),
                map("/proc/self/uid_map", format!("{uid} {uid} 1")),
                map("/proc/self/gid_map", format!("{gid} {gid} 1")),
            ],
            no_network,
            git,
        };
        let mut cmd = tokio::process::Command::new(program);
        cmd.args(args);
        // SAFETY: the child only makes system calls (unshare, open, write,
        // mount, prctl, landlock_restrict_self) with what was made above;
        // the mutex is the child's own copy, never held at the fork.
        unsafe {
            cmd.pre_exec(move || plan.apply());
        }
        Ok(cmd)
    }

    impl Plan {
        fn apply(&self) -> std::io::Result<()> {
            let fail = |what: &str| {
                let e = std::io::Error::last_os_error();
                std::io::Error::new(e.kind(), format!("{what}: {e}"))
            };
            // SAFETY: system calls on memory this plan owns.
            unsafe {
                if self.namespaces == 0 {
                    return match &self.no_network {
                        Some(filter) => self.without_namespaces(filter),
                        None => self.landlock(),
                    };
                }
                if libc::unshare(self.namespaces) != 0 {
                    return Err(fail("namespaces"));
                }
                for (path, text) in &self.maps {
                    let fd = libc::open(path.as_ptr(), libc::O_WRONLY | libc::O_CLOEXEC);
                    if fd < 0 {
                        return Err(fail("id maps"));
                    }
                    let wrote = libc::write(fd, text.as_ptr().cast(), text.len());
                    libc::close(fd);
                    if wrote != text.len() as isize {
                        return Err(fail("id maps"));
                    }
                }
                if let Some((git, flags)) = &self.git {
                    let root = c"/";
                    let none = std::ptr::null();
                    if libc::mount(
                        none,
                        root.as_ptr(),
                        none,
                        libc::MS_REC | libc::MS_PRIVATE,
                        none.cast(),
                    ) != 0
                        || libc::mount(
                            git.as_ptr(),
                            git.as_ptr(),
                            none,
                            libc::MS_BIND | libc::MS_REC,
                            none.cast(),
                        ) != 0
                        || libc::mount(
                            none,
                            git.as_ptr(),
                            none,
                            libc::MS_REMOUNT | libc::MS_BIND | libc::MS_RDONLY | flags,
                            none.cast(),
                        ) != 0
                    {
                        return Err(fail(".git read-only"));
                    }
                }
            }
            self.landlock()
        }

        /// No network without a network namespace: a seccomp filter lets
        /// sockets be made only for AF_UNIX, and io_uring not at all.
        fn without_namespaces(&self, filter: &[libc::sock_filter]) -> std::io::Result<()> {
            let program = libc::sock_fprog {
                len: filter.len() as u16,
                filter: filter.as_ptr().cast_mut(),
            };
            // SAFETY: prctl(2) with a filter program this plan owns.
            unsafe {
                if libc::prctl(libc::PR_SET_NO_NEW_PRIVS, 1, 0, 0, 0) != 0
                    || libc::prctl(
                        libc::PR_SET_SECCOMP,
                        libc::SECCOMP_MODE_FILTER,
                        &program as *const libc::sock_fprog,
                    ) != 0
                {
                    let e = std::io::Error::last_os_error();
                    return Err(std::io::Error::new(e.kind(), format!("seccomp: {e}")));
                }
            }
            self.landlock()
        }

        fn landlock(&self) -> std::io::Result<()> {
            let ruleset = self.ruleset.lock().ok().and_then(|mut r| r.take());
            match ruleset.map(RulesetCreated::restrict_self) {
                Some(Ok(_)) => Ok(()),
                Some(Err(e)) => Err(std::io::Error::other(format!("Landlock: {e}"))),
                None => Err(std::io::Error::other("Landlock: the ruleset was used")),
            }
        }
    }

    /// Read and run everywhere; write only where `writable` says, and
    /// `/dev/null`. Landlock must be there at all (else it fails); what a
    /// newer kernel adds (truncate, ioctl on devices) is used where it is.
    fn ruleset(place: &Confinement) -> Result<RulesetCreated, landlock::RulesetError> {
        let newest = ABI::V6;
        let ruleset = Ruleset::default()
            .set_compatibility(CompatLevel::HardRequirement)
            .handle_access(AccessFs::from_all(ABI::V1))?
            .set_compatibility(CompatLevel::BestEffort)
            .handle_access(AccessFs::from_all(newest))?
            .create()?;
        let write = place.writable();
        ruleset
            .add_rules(path_beneath_rules(["/"], AccessFs::from_read(newest)))?
            .add_rules(path_beneath_rules(&write, AccessFs::from_all(newest)))?
            .add_rules(path_beneath_rules(
                ["/dev/null"],
                AccessFs::WriteFile | AccessFs::ReadFile,
            ))
    }

    /// Whether this process may make user namespaces: asked once, of a
    /// forked child that tries.
    fn namespaces_allowed() -> bool {
        static ALLOWED: std::sync::OnceLock<bool> = std::sync::OnceLock::new();
        // SAFETY: the child only calls unshare(2) and _exit(2), both
        // async-signal-safe; the parent waits for that child alone.
        *ALLOWED.get_or_init(|| unsafe {
            match libc::fork() {
                -1 => false,
                0 => {
                    let made = libc::unshare(libc::CLONE_NEWUSER | libc::CLONE_NEWNET) == 0;
                    libc::_exit(if made { 0 } else { 1 })
                }
                child => {
                    let mut status = 0;
                    libc::waitpid(child, &mut status, 0) == child
                        && libc::WIFEXITED(status)
                        && libc::WEXITSTATUS(status) == 0
                }
            }
        })
    }

    /// The seccomp program of "no network": on this machine's own system
    /// call table (another architecture's, or x32's, is denied), `socket`
    /// only for AF_UNIX (else EAFNOSUPPORT) and no `io_uring_setup`
    /// (EPERM). `None` where kiln does not know the architecture.
    fn no_network_filter() -> Option<Vec<libc::sock_filter>> {
        #[cfg(target_arch = "x86_64")]
        const ARCH: u32 = 0xC000_003E;
        #[cfg(target_arch = "aarch64")]
        const ARCH: u32 = 0xC000_00B7;
        #[cfg(not(any(target_arch = "x86_64", target_arch = "aarch64")))]
        return None;
        #[cfg(any(target_arch = "x86_64", target_arch = "aarch64"))]
        {
            // Classic BPF: load a word of `seccomp_data`, jump on a
            // constant, return a verdict.
            const LOAD: u16 = 0x20;
            const JEQ: u16 = 0x15;
            const JGE: u16 = 0x35;
            const RET: u16 = 0x06;
            const X32_BIT: u32 = 0x4000_0000;
            let op = |code, k, jt, jf| libc::sock_filter { code, jt, jf, k };
            let errno = |e: i32| libc::SECCOMP_RET_ERRNO | (e as u32 & libc::SECCOMP_RET_DATA);
            Some(vec![
                op(LOAD, 4, 0, 0),                              // 0: arch
                op(JEQ, ARCH, 1, 0),                            // 1: ours → 3
                op(RET, errno(libc::EPERM), 0, 0),              // 2
                op(LOAD, 0, 0, 0),                              // 3: nr
                op(JGE, X32_BIT, 7, 0),                         // 4: x32 → 12
                op(JEQ, libc::SYS_socket as u32, 2, 0),         // 5: → 8
                op(JEQ, libc::SYS_io_uring_setup as u32, 5, 0), // 6: → 12
                op(RET, libc::SECCOMP_RET_ALLOW, 0, 0),         // 7
                op(LOAD, 16, 0, 0),                             // 8: domain
                op(JEQ, libc::AF_UNIX as u32, 0, 1),            // 9: → 10 / 11
                op(RET, libc::SECCOMP_RET_ALLOW, 0, 0),         // 10
                op(RET, errno(libc::EAFNOSUPPORT), 0, 0),       // 11
                op(RET, errno(libc::EPERM), 0, 0),              // 12
            ])
        }
    }

    fn cstring(path: &Path) -> Result<CString, String> {
        CString::new(path.as_os_str().as_bytes())
            .map_err(|_| format!("{}: a path with a NUL byte", path.display()))
    }

    /// The flags a read-only bind mount of `path` must keep: a user
    /// namespace may not drop `nosuid`, `nodev`, `noexec` or atime flags
    /// that the mount under it has.
    fn mount_flags(path: &Path) -> Result<libc::c_ulong, String> {
        let c = cstring(path)?;
        // SAFETY: statvfs(3) into a zeroed struct it fills.
        let mut st: libc::statvfs = unsafe { std::mem::zeroed() };
        if unsafe { libc::statvfs(c.as_ptr(), &mut st) } != 0 {
            return Err(format!(
                "{}: {}",
                path.display(),
                std::io::Error::last_os_error()
            ));
        }
        let kept = [
            (libc::ST_NOSUID, libc::MS_NOSUID),
            (libc::ST_NODEV, libc::MS_NODEV),
            (libc::ST_NOEXEC, libc::MS_NOEXEC),
            (libc::ST_NOATIME, libc::MS_NOATIME),
            (libc::ST_NODIRATIME, libc::MS_NODIRATIME),
            (libc::ST_RELATIME, libc::MS_RELATIME),
        ];
        Ok(kept
            .iter()
            .filter(|(st_flag, _)| st.f_flag & st_flag != 0)
            .fold(0, |acc, (_, ms)| acc | ms))
    }
}

#[cfg(target_os = "macos")]
mod platform {
    use std::path::Path;

    use super::Confinement;

    /// `sandbox-exec -p PROFILE program args…`.
    pub fn command(
        place: &Confinement,
        program: &str,
        args: &[&std::ffi::OsStr],
    ) -> Result<tokio::process::Command, String> {
        let exec = Path::new("/usr/bin/sandbox-exec");
        if !exec.exists() {
            return Err("/usr/bin/sandbox-exec is missing".into());
        }
        let mut cmd = tokio::process::Command::new(exec);
        cmd.arg("-p").arg(place.profile()).arg(program).args(args);
        Ok(cmd)
    }
}

#[cfg(not(any(target_os = "linux", target_os = "macos")))]
mod platform {
    use super::Confinement;

    pub fn command(
        _place: &Confinement,
        _program: &str,
        _args: &[&std::ffi::OsStr],
    ) -> Result<tokio::process::Command, String> {
        Err("no sandbox on this system".into())
    }
}

impl Confinement {
    /// The Seatbelt profile of the policy (macOS `sandbox-exec -p`): deny
    /// by default, read and run everywhere, write where `writable` says
    /// and `/dev/null`, the network only when allowed. Paths are quoted as
    /// the profile language's strings.
    pub fn profile(&self) -> String {
        let quote = |p: &Path| {
            let s = p.to_string_lossy();
            format!("\"{}\"", s.replace('\\', "\\\\").replace('"', "\\\""))
        };
        let mut p = String::from(
            // What shells and build tools need to start at all (as Codex's
            // base policy grants), then reads everywhere.
            "(version 1)\n(deny default)\n(allow process-exec)\n(allow process-fork)\n(allow signal (target same-sandbox))\n(allow process-info* (target same-sandbox))\n(allow sysctl-read)\n(allow mach-lookup)\n(allow user-preference-read)\n(allow ipc-posix-sem)\n(allow pseudo-tty)\n(allow file-ioctl (literal \"/dev/null\") (literal \"/dev/tty\"))\n(allow file-read*)\n(allow file-write-data (literal \"/dev/null\"))\n",
        );
        let git = self.workspace.join(".git");
        for path in self.writable() {
            let rule = match path == self.workspace {
                // The workspace but its .git, which stays read-only.
                true => format!(
                    "(require-all (subpath {}) (require-not (subpath {})))",
                    quote(path),
                    quote(&git)
                ),
                false => format!("(subpath {})", quote(path)),
            };
            p.push_str(&format!("(allow file-write* {rule})\n"));
        }
        if self.sandbox.network {
            p.push_str("(allow network*)\n");
        }
        p
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_macos_profile_denies_by_default_and_writes_where_the_mode_says() {
        let ws = Path::new("/Users/me/my \"project\"");
        let tmp = Path::new("/private/tmp/kiln-call");
        let place = |sandbox| Confinement {
            sandbox,
            workspace: ws.to_path_buf(),
            temp: tmp.to_path_buf(),
        };
        let p = place(Sandbox::default()).profile();
        assert!(p.starts_with("(version 1)\n(deny default)\n"), "{p}");
        assert!(
            p.contains(r#"(allow file-write* (require-all (subpath "/Users/me/my \"project\"") (require-not (subpath "/Users/me/my \"project\"/.git"))))"#),
            "{p}"
        );
        assert!(
            p.contains(r#"(allow file-write* (subpath "/private/tmp/kiln-call"))"#),
            "{p}"
        );
        assert!(!p.contains("network"), "{p}");
        let read_only = place(Sandbox {
            mode: SandboxMode::ReadOnly,
            network: true,
        })
        .profile();
        assert!(!read_only.contains("project"), "{read_only}");
        assert!(read_only.contains("(allow network*)"), "{read_only}");
    }

    #[test]
    fn the_policy_reads_in_a_few_words() {
        assert_eq!(
            Sandbox::default().describe(),
            "sandbox: writes in the workspace only, no network"
        );
        let off = Sandbox {
            mode: SandboxMode::Off,
            network: false,
        };
        assert_eq!(off.describe(), "no sandbox: all your rights");
    }
}
