//! Runs a host program under limits on memory (address space), CPU time and wall time, and says
//! which limit stopped it. Every `qemu-img` call on an imported image goes through here: the
//! image is an API caller's data, and `qemu-img` reading a crafted one must not take the host's
//! memory or CPU, or hold a check forever.
//!
//! The memory and CPU limits are set by util-linux's `prlimit` just before it executes the
//! program (the workspace forbids `unsafe`, which a `pre_exec` hook needs); the wall-time limit
//! is a timeout here that kills the process.

use std::ffi::OsStr;
use std::os::unix::process::ExitStatusExt;
use std::process::Output;
use std::time::Duration;

/// How much a bounded program may take.
#[derive(Debug, Clone, Copy)]
pub struct Limits {
    /// Address space, in bytes (`RLIMIT_AS`).
    pub memory: u64,
    /// CPU time, in seconds (`RLIMIT_CPU`): the program gets `SIGXCPU` when it is used up.
    pub cpu_secs: u64,
    pub wall: Duration,
}

#[derive(Debug, thiserror::Error)]
pub enum BoundedError {
    #[error("cannot run {program}: {source}")]
    Spawn {
        program: String,
        #[source]
        source: std::io::Error,
    },
    #[error("{program} did not finish within {} s and was stopped", seconds(*.limit))]
    WallTime { program: String, limit: Duration },
    #[error("{program} used up its {secs} s of CPU time and was stopped")]
    CpuTime { program: String, secs: u64 },
    #[error("{program} ran out of its {mib} MiB memory limit")]
    Memory { program: String, mib: u64 },
    #[error("{program} was killed by signal {signal}")]
    Signal { program: String, signal: i32 },
}

const SIGXCPU: i32 = 24;

/// Whole seconds as such, shorter limits (tests) with their fraction.
fn seconds(d: Duration) -> String {
    if d.subsec_millis() == 0 {
        d.as_secs().to_string()
    } else {
        format!("{:.1}", d.as_secs_f64())
    }
}

/// Runs `program args…` under `limits` and returns its output (whatever its exit code) unless a
/// limit stopped it.
pub async fn run<S: AsRef<OsStr>>(program: &str, args: &[S], limits: &Limits) -> Result<Output, BoundedError> {
    let mut cmd = tokio::process::Command::new("prlimit");
    // The hard CPU limit a little above the soft one: the program gets SIGXCPU (which names the
    // cause) before the kernel's SIGKILL.
    cmd.arg(format!("--as={}", limits.memory))
        .arg(format!("--cpu={}:{}", limits.cpu_secs, limits.cpu_secs + 2))
        .arg("--")
        .arg(program)
        .args(args)
        .stdin(std::process::Stdio::null())
        .kill_on_drop(true);
    let spawn_error = |source| BoundedError::Spawn { program: program.to_string(), source };
    let out = match tokio::time::timeout(limits.wall, cmd.output()).await {
        Ok(out) => out.map_err(spawn_error)?,
        // Dropping the future kills the process (kill_on_drop).
        Err(_) => return Err(BoundedError::WallTime { program: program.to_string(), limit: limits.wall }),
    };
    let program = program.to_string();
    // prlimit could not start the program.
    if out.status.code() == Some(127) || out.status.code() == Some(126) {
        let why = String::from_utf8_lossy(&out.stderr).trim().to_string();
        return Err(spawn_error(std::io::Error::other(why)));
    }
    let stderr = String::from_utf8_lossy(&out.stderr);
    let memory = || BoundedError::Memory { program: program.clone(), mib: limits.memory >> 20 };
    match out.status.signal() {
        Some(SIGXCPU) => return Err(BoundedError::CpuTime { program, secs: limits.cpu_secs }),
        // GLib aborts when an allocation fails.
        Some(_) if stderr.contains("allocate") => return Err(memory()),
        Some(signal) => return Err(BoundedError::Signal { program, signal }),
        None => {}
    }
    // qemu-img's and coreutils' ways of saying an allocation failed.
    let out_of_memory = ["Cannot allocate memory", "cannot allocate", "memory exhausted", "Out of memory"];
    if !out.status.success() && out_of_memory.iter().any(|m| stderr.contains(m)) {
        return Err(memory());
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    const ROOMY: Limits = Limits { memory: 1 << 30, cpu_secs: 60, wall: Duration::from_secs(60) };

    #[tokio::test]
    async fn a_program_within_its_limits_runs_as_usual() {
        let out = run("sh", &["-c", "echo hello; exit 3"], &ROOMY).await.unwrap();
        assert_eq!(out.status.code(), Some(3));
        assert_eq!(String::from_utf8_lossy(&out.stdout), "hello\n");
    }

    #[tokio::test]
    async fn a_program_over_its_wall_time_is_killed_and_reported() {
        let dir = tempfile::tempdir().unwrap();
        let marker = dir.path().join("still-running");
        let script = format!("sleep 3; touch {}", marker.display());
        let limits = Limits { wall: Duration::from_millis(500), ..ROOMY };
        let started = std::time::Instant::now();
        let e = run("sh", &["-c", &script], &limits).await.unwrap_err();
        assert!(started.elapsed() < Duration::from_secs(2), "stopped at the limit: {:?}", started.elapsed());
        assert!(matches!(e, BoundedError::WallTime { .. }), "{e:?}");
        assert_eq!(e.to_string(), "sh did not finish within 0.5 s and was stopped");
        tokio::time::sleep(Duration::from_secs(4)).await;
        assert!(!marker.exists(), "the program was killed, not left running");
    }

    #[tokio::test]
    async fn a_program_over_its_cpu_time_is_stopped_and_reported() {
        let limits = Limits { cpu_secs: 1, ..ROOMY };
        let e = run("sh", &["-c", "while :; do :; done"], &limits).await.unwrap_err();
        assert!(matches!(e, BoundedError::CpuTime { secs: 1, .. }), "{e:?}");
        assert!(e.to_string().contains("CPU time"), "{e}");
    }

    #[tokio::test]
    async fn a_program_over_its_memory_is_reported() {
        // dd must allocate its whole 300 MiB block at once, which 256 MiB of address space cannot
        // hold (qemu-img's own needs vary with the image, so it does not make a repeatable test).
        let limits = Limits { memory: 256 << 20, ..ROOMY };
        let e = run("dd", &["if=/dev/zero", "of=/dev/null", "bs=300M", "count=1"], &limits).await.unwrap_err();
        assert!(matches!(e, BoundedError::Memory { mib: 256, .. }), "{e:?}");
        assert!(run("dd", &["if=/dev/zero", "of=/dev/null", "bs=64M", "count=1"], &limits).await.is_ok());
    }
}
