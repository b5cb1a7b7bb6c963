//! Starts and stops a local `nats-server` (JetStream on, data under a given directory). Used by
//! the launcher when no `nats.url` is configured, and by the test harness and benchmarks. The
//! child is started on a free port chosen by the server itself (`-p -1`, read back from the
//! ports file), is killed when this handle drops, and dies with its parent (PDEATHSIG).

use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::time::Duration;

use anyhow::{Context, bail};

pub struct NatsServer {
    child: Option<tokio::process::Child>,
    /// With the credentials clients need.
    url: String,
    /// Without credentials.
    public_url: String,
    log_file: PathBuf,
    run_dir: PathBuf,
    /// The privileged user's password, from which each service's is derived.
    admin_password: Option<String>,
}

#[derive(Debug, Clone)]
pub struct NatsServerOptions {
    pub binary: PathBuf,
    pub store_dir: PathBuf,
    /// Where the ports file and log go.
    pub run_dir: PathBuf,
    /// Extra configuration file contents (e.g. `jetstream { sync_interval: always }`).
    pub extra_config: Option<String>,
    /// The privileged user and its password; each service gets a user of its own with a
    /// password derived from it and the permissions of [`crate::nats_access`]. `None` runs the
    /// server open (only for tests that need it).
    pub credentials: Option<(String, String)>,
    /// Serve the HTTP monitoring endpoints (`/varz`, `/jsz`, `/connz`) on a loopback port. Only
    /// for the tests and benchmarks that read them: they are not password protected, and on a
    /// machine running local workers anything on loopback could read them.
    pub monitoring: bool,
    /// Environment of the server process: values its configuration names as `$VARIABLE`.
    pub env: Vec<(String, String)>,
}

/// Finds nats-server: `explicit`, then `<project>/.tools/nats/bin/nats-server` (the project's
/// install script puts it there), then `nats-server` on PATH.
pub fn find_binary(explicit: Option<&Path>, project_root: &Path) -> anyhow::Result<PathBuf> {
    if let Some(path) = explicit {
        if path.is_file() {
            return Ok(path.to_path_buf());
        }
        bail!("nats-server binary '{}' does not exist", path.display());
    }
    let local = project_root.join(".tools/nats/bin/nats-server");
    if local.is_file() {
        return Ok(local);
    }
    if let Some(paths) = std::env::var_os("PATH") {
        for dir in std::env::split_paths(&paths) {
            let candidate = dir.join("nats-server");
            if candidate.is_file() {
                return Ok(candidate);
            }
        }
    }
    bail!(
        "nats-server not found: run ops/scripts/install-nats.sh (installs 2.15.x into .tools/nats) \
         or set AF_NATS_SERVER_BIN"
    )
}

impl NatsServer {
    pub async fn start(options: &NatsServerOptions) -> anyhow::Result<Self> {
        std::fs::create_dir_all(&options.store_dir)
            .with_context(|| format!("creating {}", options.store_dir.display()))?;
        std::fs::create_dir_all(&options.run_dir).with_context(|| format!("creating {}", options.run_dir.display()))?;
        // A ports file left by a previous (killed) server would be read as ours.
        for entry in std::fs::read_dir(&options.run_dir)?.flatten() {
            if entry.path().extension().is_some_and(|e| e == "ports") {
                let _ = std::fs::remove_file(entry.path());
            }
        }
        let log_file = options.run_dir.join("nats-server.log");
        let mut cmd = tokio::process::Command::new(&options.binary);
        cmd.args(["-a", "127.0.0.1", "-p", "-1", "-js"]);
        if options.monitoring {
            cmd.args(["--http_port", "-1"]);
        }
        cmd.arg("-sd").arg(&options.store_dir).arg("--ports_file_dir").arg(&options.run_dir).arg("-l").arg(&log_file);
        let mut config = String::new();
        if let Some((user, password)) = &options.credentials {
            // Only the launcher (or harness) and the services hold these; workers reach the
            // control plane through ingress.
            let quoted = |p: &str| format!("\"{p}\"");
            config.push_str(&crate::nats_access::authorization_block(user, &quoted(password), |service| {
                quoted(&crate::nats_access::derived_password(password, service))
            }));
        }
        config.push_str(options.extra_config.as_deref().unwrap_or_default());
        if !config.is_empty() {
            let conf = options.run_dir.join("server.conf");
            write_private(&conf, &config)?;
            cmd.arg("-c").arg(conf);
        }
        cmd.envs(options.env.iter().map(|(k, v)| (k, v)));
        cmd.stdin(Stdio::null()).stdout(Stdio::null()).stderr(Stdio::null()).kill_on_drop(true);
        // Its own process group: a terminal's Ctrl-C reaches the launcher, which stops the
        // services first and the server last, instead of the server dying under them.
        cmd.process_group(0);
        die_with_parent(&mut cmd);
        let mut child = cmd.spawn().with_context(|| format!("starting {}", options.binary.display()))?;

        let deadline = tokio::time::Instant::now() + Duration::from_secs(15);
        let url = loop {
            if let Some(url) = read_ports(&options.run_dir, "nats") {
                break url;
            }
            if let Some(status) = child.try_wait()? {
                bail!("nats-server exited with {status} during start-up:\n{}", log_tail(&log_file));
            }
            if tokio::time::Instant::now() > deadline {
                bail!("nats-server did not report its ports within 15 s:\n{}", log_tail(&log_file));
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        };
        let public_url = url;
        let url = match &options.credentials {
            Some((user, password)) => public_url.replacen("://", &format!("://{user}:{password}@"), 1),
            None => public_url.clone(),
        };
        Ok(Self {
            child: Some(child),
            url,
            public_url,
            log_file,
            run_dir: options.run_dir.clone(),
            admin_password: options.credentials.as_ref().map(|(_, p)| p.clone()),
        })
    }

    /// The URL clients connect with, credentials included: give it only to the services.
    pub fn url(&self) -> &str {
        &self.url
    }

    /// The URL `service` connects with: its own user, with only that service's permissions.
    /// The privileged URL when the server runs without authentication.
    pub fn service_url(&self, service: &str) -> String {
        match &self.admin_password {
            Some(admin) => {
                let password = crate::nats_access::derived_password(admin, service);
                self.public_url.replacen("://", &format!("://{service}:{password}@"), 1)
            }
            None => self.url.clone(),
        }
    }

    /// The URL without credentials, for logs and banners.
    pub fn public_url(&self) -> &str {
        &self.public_url
    }

    /// The HTTP monitoring endpoint (`/varz`, `/jsz`), on a port the server chose.
    pub fn monitoring_url(&self) -> Option<String> {
        read_ports(&self.run_dir, "monitoring")
    }

    pub fn pid(&self) -> Option<u32> {
        self.child.as_ref().and_then(|c| c.id())
    }

    /// Resolves when the server process exits (never, once [`NatsServer::stop`] took it).
    pub async fn exited(&mut self) -> std::io::Result<std::process::ExitStatus> {
        match self.child.as_mut() {
            Some(child) => child.wait().await,
            None => std::future::pending().await,
        }
    }

    /// Asks the server to shut down (SIGTERM) and waits for it; kills it after `grace`.
    pub async fn stop(&mut self, grace: Duration) {
        let Some(mut child) = self.child.take() else {
            return;
        };
        if let Some(pid) = child.id() {
            signal(pid, libc::SIGTERM);
        }
        if tokio::time::timeout(grace, child.wait()).await.is_err() {
            let _ = child.kill().await;
        }
    }

    pub fn log_tail(&self) -> String {
        log_tail(&self.log_file)
    }
}

/// Writes `text` to `path` readable by the owner only (it may hold the server's password).
fn write_private(path: &Path, text: &str) -> std::io::Result<()> {
    use std::io::Write;
    use std::os::unix::fs::OpenOptionsExt;
    let mut file = std::fs::OpenOptions::new().write(true).create(true).truncate(true).mode(0o600).open(path)?;
    file.write_all(text.as_bytes())
}

/// The first `kind` ("nats", "monitoring") address in the server's ports file.
fn read_ports(dir: &Path, kind: &str) -> Option<String> {
    let entry = std::fs::read_dir(dir).ok()?.flatten().find(|e| e.path().extension().is_some_and(|x| x == "ports"))?;
    let text = std::fs::read_to_string(entry.path()).ok()?;
    let json: serde_json::Value = serde_json::from_str(&text).ok()?;
    json.get(kind)?.as_array()?.first()?.as_str().map(str::to_string)
}

fn log_tail(path: &Path) -> String {
    let text = std::fs::read_to_string(path).unwrap_or_default();
    let lines: Vec<&str> = text.lines().collect();
    lines[lines.len().saturating_sub(20)..].join("\n")
}

/// Sends `sig` to `pid`.
#[allow(unsafe_code)]
pub fn signal(pid: u32, sig: libc::c_int) {
    // SAFETY: kill(2) has no memory-safety preconditions.
    unsafe {
        libc::kill(pid as libc::pid_t, sig);
    }
}

/// Asks the kernel to SIGTERM the child when the thread that spawned it dies, so a launcher
/// killed with SIGKILL does not leave an orphaned server holding the data directory.
#[allow(unsafe_code)]
pub fn die_with_parent(cmd: &mut tokio::process::Command) {
    // SAFETY: prctl(PR_SET_PDEATHSIG) is async-signal-safe and touches no memory of ours.
    unsafe {
        cmd.pre_exec(|| {
            libc::prctl(libc::PR_SET_PDEATHSIG, libc::SIGTERM);
            Ok(())
        });
    }
}
