//! Child processes for the tests that drive real binaries (the `keygate` CLI and server,
//! grpcurl): bounded in time, killed on drop, and never blocking the async runtime the
//! in-process server under test runs on (`#[sqlx::test]` uses a current-thread runtime).

use std::{
    io::{Read, Write},
    path::Path,
    process::{Child, Command, ExitStatus, Stdio},
    time::Duration,
};

/// Generous: the CI machine has two cores shared by a whole test suite.
pub const COMMAND_TIMEOUT: Duration = Duration::from_secs(60);

/// A running child that is killed (and reaped) when dropped, so a failing test leaves nothing
/// running.
pub struct ChildGuard {
    child: Child,
    name: String,
}

impl ChildGuard {
    pub fn spawn(mut command: Command, name: &str) -> Self {
        let child = command
            .spawn()
            .unwrap_or_else(|e| panic!("cannot start {name}: {e}"));
        Self {
            child,
            name: name.to_owned(),
        }
    }

    pub fn id(&self) -> u32 {
        self.child.id()
    }

    /// `Some(status)` once the child has exited.
    pub fn exited(&mut self) -> Option<ExitStatus> {
        self.child
            .try_wait()
            .unwrap_or_else(|e| panic!("cannot poll {}: {e}", self.name))
    }

    /// Waits (without blocking the runtime) for the child to exit; panics after `timeout`.
    pub async fn wait(&mut self, timeout: Duration) -> ExitStatus {
        let deadline = tokio::time::Instant::now() + timeout;
        loop {
            if let Some(status) = self.exited() {
                return status;
            }
            assert!(
                tokio::time::Instant::now() < deadline,
                "{} did not exit within {timeout:?}",
                self.name
            );
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }

    /// Sends SIGTERM (as an orchestrator would) and waits for the exit.
    pub async fn terminate(&mut self, timeout: Duration) -> ExitStatus {
        let sent = Command::new("kill")
            .args(["-TERM", &self.id().to_string()])
            .status()
            .expect("run kill(1)");
        assert!(sent.success(), "kill -TERM {} failed", self.id());
        self.wait(timeout).await
    }

    fn take_pipes(
        &mut self,
    ) -> (
        Option<std::process::ChildStdout>,
        Option<std::process::ChildStderr>,
    ) {
        (self.child.stdout.take(), self.child.stderr.take())
    }
}

impl Drop for ChildGuard {
    fn drop(&mut self) {
        if matches!(self.child.try_wait(), Ok(None)) {
            let _ = self.child.kill();
        }
        let _ = self.child.wait();
    }
}

/// What a finished command printed.
pub struct Finished {
    pub status: ExitStatus,
    pub stdout: String,
    pub stderr: String,
}

impl Finished {
    pub fn success(&self) -> bool {
        self.status.success()
    }

    /// Panics with the command's output unless it exited with status 0.
    pub fn expect_success(self, what: &str) -> Self {
        assert!(self.success(), "{what} failed: {self}");
        self
    }
}

impl std::fmt::Display for Finished {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "{}\n--- stdout ---\n{}\n--- stderr ---\n{}",
            self.status, self.stdout, self.stderr
        )
    }
}

/// Runs `command` to completion with `stdin` as its input, capturing its output; panics (and
/// kills it) if it runs longer than `COMMAND_TIMEOUT`.
pub async fn run(mut command: Command, stdin: Option<&str>) -> Finished {
    let name = format!("{:?}", command.get_program());
    command
        .stdin(if stdin.is_some() {
            Stdio::piped()
        } else {
            Stdio::null()
        })
        .stdout(Stdio::piped())
        .stderr(Stdio::piped());
    let mut child = ChildGuard::spawn(command, &name);
    if let Some(input) = stdin {
        let mut pipe = child.child.stdin.take().expect("piped stdin");
        let input = input.to_owned();
        tokio::task::spawn_blocking(move || {
            // The child may exit without reading; that is its business.
            let _ = pipe.write_all(input.as_bytes());
        });
    }
    let (stdout, stderr) = child.take_pipes();
    let read = |pipe: Option<Box<dyn Read + Send>>| {
        tokio::task::spawn_blocking(move || {
            let mut text = String::new();
            if let Some(mut pipe) = pipe {
                let _ = pipe.read_to_string(&mut text);
            }
            text
        })
    };
    let stdout = read(stdout.map(|p| Box::new(p) as Box<dyn Read + Send>));
    let stderr = read(stderr.map(|p| Box::new(p) as Box<dyn Read + Send>));
    let status = child.wait(COMMAND_TIMEOUT).await;
    Finished {
        status,
        stdout: stdout.await.expect("stdout reader"),
        stderr: stderr.await.expect("stderr reader"),
    }
}

/// A `keygate` command with a clean environment: no DATABASE_URL, no KEYGATE_* variable the
/// test did not set itself.
pub fn keygate_command(working_dir: &Path) -> Command {
    let mut command = Command::new(crate::helpers::keygate_binary());
    command.env_clear().current_dir(working_dir);
    if let Some(path) = std::env::var_os("PATH") {
        command.env("PATH", path);
    }
    command
}
