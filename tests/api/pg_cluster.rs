//! A throwaway PostgreSQL cluster (initdb + pg_ctl in a temporary directory, on a free port)
//! that a test can stop and start again, to see what keygate does when its database goes away.
//! Stopped on drop.

use std::{
    path::PathBuf,
    process::{Command, Output},
};

use tempfile::TempDir;

pub struct PgCluster {
    dir: TempDir,
    bin: PathBuf,
    pub port: u16,
    /// Run the server binaries as this user (initdb refuses to run as root).
    run_as: Option<&'static str>,
}

/// The directory holding initdb and pg_ctl: on PATH, or Debian's versioned directory.
fn postgres_bin_dir() -> PathBuf {
    if let Ok(dir) = std::env::var("KEYGATE_TEST_PG_BIN") {
        return PathBuf::from(dir);
    }
    let on_path = std::env::var_os("PATH").and_then(|paths| {
        std::env::split_paths(&paths)
            .find(|dir| dir.join("initdb").is_file() && dir.join("pg_ctl").is_file())
    });
    if let Some(dir) = on_path {
        return dir;
    }
    let mut versions: Vec<PathBuf> = std::fs::read_dir("/usr/lib/postgresql")
        .map(|entries| {
            entries
                .filter_map(|entry| entry.ok().map(|e| e.path().join("bin")))
                .filter(|bin| bin.join("initdb").is_file())
                .collect()
        })
        .unwrap_or_default();
    versions.sort();
    versions.pop().unwrap_or_else(|| {
        panic!(
            "the database outage tests need PostgreSQL's initdb and pg_ctl: install the \
             `postgresql` package (scripts/start-postgres.sh does) or set KEYGATE_TEST_PG_BIN"
        )
    })
}

fn is_root() -> bool {
    Command::new("id")
        .arg("-u")
        .output()
        .map(|out| String::from_utf8_lossy(&out.stdout).trim() == "0")
        .unwrap_or(false)
}

impl PgCluster {
    /// Creates and starts a new cluster with trust authentication for `postgres` on 127.0.0.1.
    pub fn start() -> Self {
        let dir = tempfile::Builder::new()
            .prefix("keygate-pg-")
            .tempdir()
            .expect("temporary directory");
        let run_as = is_root().then_some("postgres");
        if let Some(user) = run_as {
            let status = Command::new("chown")
                .args([user, &dir.path().display().to_string()])
                .status()
                .expect("run chown");
            assert!(status.success(), "chown {user} {}", dir.path().display());
        }
        let cluster = Self {
            bin: postgres_bin_dir(),
            port: crate::helpers::free_port(),
            dir,
            run_as,
        };
        let data = cluster.data_dir();
        cluster.run(
            "initdb",
            &[
                "-D",
                &data.display().to_string(),
                "-A",
                "trust",
                "-U",
                "postgres",
                "--no-sync",
                "--no-instructions",
                "-E",
                "UTF8",
            ],
        );
        cluster.start_on(cluster.port);
        cluster
    }

    fn data_dir(&self) -> PathBuf {
        self.dir.path().join("data")
    }

    pub fn url(&self) -> String {
        format!("postgres://postgres@127.0.0.1:{}/postgres", self.port)
    }

    pub fn url_on(&self, port: u16) -> String {
        format!("postgres://postgres@127.0.0.1:{port}/postgres")
    }

    fn run(&self, program: &str, args: &[&str]) -> Output {
        let binary = self.bin.join(program);
        let mut command = match self.run_as {
            Some(user) => {
                let mut command = Command::new("runuser");
                command.args(["-u", user, "--"]).arg(&binary);
                command
            }
            None => Command::new(&binary),
        };
        // The server must not pick up the test suite's own connection settings.
        command
            .env_remove("PGPORT")
            .env_remove("PGHOST")
            .env_remove("PGDATA");
        let output = command
            .args(args)
            .current_dir(self.dir.path())
            .output()
            .unwrap_or_else(|e| panic!("run {}: {e}", binary.display()));
        assert!(
            output.status.success(),
            "{program} {args:?} failed: {}{}\nserver log:\n{}",
            String::from_utf8_lossy(&output.stdout),
            String::from_utf8_lossy(&output.stderr),
            self.log()
        );
        output
    }

    /// Starts the server on `port` (normally its own; another one makes it unreachable for
    /// clients that know only the first) and waits until it accepts connections.
    pub fn start_on(&self, port: u16) {
        let socket_dir = self.dir.path().display().to_string();
        let options = format!(
            "-p {port} -k {socket_dir} -c listen_addresses=127.0.0.1 -c fsync=off \
             -c max_connections=200"
        );
        self.run(
            "pg_ctl",
            &[
                "-D",
                &self.data_dir().display().to_string(),
                "-o",
                &options,
                "-l",
                &self.log_path().display().to_string(),
                "-w",
                "-t",
                "60",
                "start",
            ],
        );
    }

    /// `pg_ctl stop -m immediate`: every connection is cut at once, as in a crash.
    pub fn stop(&self) {
        self.run(
            "pg_ctl",
            &[
                "-D",
                &self.data_dir().display().to_string(),
                "-m",
                "immediate",
                "-w",
                "-t",
                "60",
                "stop",
            ],
        );
    }

    fn log_path(&self) -> PathBuf {
        self.dir.path().join("server.log")
    }

    pub fn log(&self) -> String {
        std::fs::read_to_string(self.log_path()).unwrap_or_default()
    }
}

impl Drop for PgCluster {
    fn drop(&mut self) {
        // Best effort, and quiet: the cluster may be stopped already.
        let binary = self.bin.join("pg_ctl");
        let mut command = match self.run_as {
            Some(user) => {
                let mut command = Command::new("runuser");
                command.args(["-u", user, "--"]).arg(&binary);
                command
            }
            None => Command::new(&binary),
        };
        let _ = command
            .args(["-D", &self.data_dir().display().to_string()])
            .args(["-m", "immediate", "-w", "-t", "30", "stop"])
            .stdout(std::process::Stdio::null())
            .stderr(std::process::Stdio::null())
            .status();
    }
}
