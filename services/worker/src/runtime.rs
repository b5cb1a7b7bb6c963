//! The worker's life: boot (spec §4.3), the main loop (§4.4) and job processing (§4.5), with
//! the spec's weak spots fixed:
//!
//! - claims long-poll (`waitMs`) instead of polling every 2 s, and the control state is read
//!   once per claim round (R4);
//! - a worker that was not pre-assigned restores its conversation's snapshot before its first
//!   job (D4);
//! - a Telegram job without a bot token fails before any side effect, and jobs of other
//!   providers never need one (R2);
//! - any failure while hydrating or processing fails the job with its message instead of
//!   leaving it `processing` until lease expiry (R3);
//! - side effects are journalled per job, so a retry does not append history or message the
//!   user twice (R1);
//! - the prompt gets every history item the bundle ships, not the last 12 (R6, engine side).
//!
//! Stopping: a stop signal (the cancellation token: SIGTERM/SIGINT in the binary) lets the
//! current job finish; then the workspace is snapshotted (reason `signal`; `manual` after the
//! local idle timeout; `drain` when the control state reports the row draining) and
//! [`Worker::run`] returns.

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

use common::api::history::{AppendMessagesArgs, BundleArgs, NewHistoryItem};
use common::api::queue::{Claim, ClaimArgs, ConversationArgs, FailArgs, LeaseArgs, WorkerIdArgs};
use common::api::{self, Ignored};
use common::clock::Clock;
use common::ids::{AgentKey, ConversationId, WorkerId};
use common::{ErrorCode, OpError};
use serde_json::{Value, json};
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;
use tracing::Instrument;
use worker_kit::attachments::{self, BundleAttachment};
use worker_kit::client::{SnapshotScope, UploadedSnapshot, WorkerClient};

use crate::config::{SkillsMode, Transport, WorkerConfig};
use crate::engine::{self, Engine, EngineJob, HistoryRole};
use crate::telegram::{self, Replier, Reply};
use crate::workspace::{self, Journal, MemoryEntry};

/// First pause after a failed backend call in the loop; doubles up to [`MAX_BACKOFF`].
const MIN_BACKOFF: Duration = Duration::from_millis(500);
const MAX_BACKOFF: Duration = Duration::from_secs(30);

/// Why the worker stopped; also the snapshot's `reason`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum StopReason {
    /// A stop signal, or the control state asked to stop (other than draining).
    Signal,
    /// The local idle timeout (`WORKER_IDLE_TIMEOUT_MS`) passed without work.
    Manual,
    /// The control state reported the worker row `draining`.
    Drain,
}

impl StopReason {
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Signal => "signal",
            Self::Manual => "manual",
            Self::Drain => "drain",
        }
    }
}

/// What a run did.
#[derive(Debug, Clone)]
pub struct RunOutcome {
    pub reason: StopReason,
    /// The control state's reason when it asked the worker to stop (`status_draining`, …).
    pub control_reason: Option<String>,
    /// The conversation the worker served, if it knew one.
    pub conversation_id: Option<String>,
    /// The shutdown snapshot, when one was uploaded.
    pub snapshot: Option<UploadedSnapshot>,
    pub jobs_completed: u64,
    pub jobs_failed: u64,
}

/// A failure that ends the worker. The binary exits 1 when it looks transient (the platform
/// may restart the worker), else 2 (spec §4.4).
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{message}")]
pub struct WorkerError {
    pub message: String,
    pub retryable: bool,
}

impl WorkerError {
    pub fn new(message: impl Into<String>) -> Self {
        let message = message.into();
        let retryable = looks_retryable(&message);
        Self { message, retryable }
    }

    /// The process exit code for this failure.
    pub fn exit_code(&self) -> i32 {
        if self.retryable { 1 } else { 2 }
    }
}

/// The spec's `/timeout|network|429|5\d\d/i`, with `timed out`, `unavailable` and `connect`
/// added (this project's and the NATS client's wording for the same conditions).
pub fn looks_retryable(message: &str) -> bool {
    let lower = message.to_lowercase();
    if ["timeout", "timed out", "network", "429", "unavailable", "connect"].iter().any(|w| lower.contains(w)) {
        return true;
    }
    let bytes = lower.as_bytes();
    bytes.windows(3).enumerate().any(|(i, w)| {
        w[0] == b'5'
            && w[1].is_ascii_digit()
            && w[2].is_ascii_digit()
            && (i == 0 || !bytes[i - 1].is_ascii_digit())
            && bytes.get(i + 3).is_none_or(|b| !b.is_ascii_digit())
    })
}

/// An operation error the loop cannot outlive: the token is wrong or belongs to another worker.
fn is_fatal(e: &OpError) -> bool {
    matches!(e.code, ErrorCode::Unauthenticated | ErrorCode::Forbidden)
}

/// Connects to the control plane as `config` says.
pub async fn connect(config: &WorkerConfig) -> Result<WorkerClient, WorkerError> {
    match &config.transport {
        Transport::Nats { url } => {
            // A URL with `user:password@` (the password-protected server of the stack) sends
            // them as the client's credentials; errors name the address only.
            let (address, credentials) = common::service::split_credentials(url);
            let mut options = async_nats::ConnectOptions::new()
                .name(format!("af-worker {}", config.worker_id))
                .connection_timeout(config.request_timeout);
            if let Some((user, password)) = credentials {
                options = options.user_and_password(user, password);
            }
            let nats = options
                .connect(address.as_str())
                .await
                .map_err(|e| WorkerError::new(format!("cannot connect to NATS at {address}: {e}")))?;
            Ok(WorkerClient::over_nats(nats, &config.worker_id, &config.token, config.request_timeout))
        }
        Transport::Http { base_url } => Ok(WorkerClient::over_http(base_url, &config.worker_id, &config.token)
            .with_request_timeout(config.request_timeout)),
    }
}

/// Connects, builds the configured engine and runs the worker until it stops.
pub async fn run(config: WorkerConfig, shutdown: CancellationToken) -> Result<RunOutcome, WorkerError> {
    let client = connect(&config).await?;
    let engine = engine::build(&config);
    Worker::new(config, client, engine).run(shutdown).await
}

/// `claimNextJob`'s answer.
type ClaimedJob = Claim;

/// The conversation this worker is bound to.
#[derive(Debug, Clone, PartialEq, Eq)]
struct Sticky {
    conversation_id: ConversationId,
    agent_key: AgentKey,
}

/// One worker process's state.
pub struct Worker {
    config: WorkerConfig,
    client: WorkerClient,
    engine: Arc<dyn Engine>,
    telegram: Replier,
    clock: Clock,
    sticky: Option<Sticky>,
    /// Whether the snapshot question has been settled (restored, nothing to restore, or the
    /// data directory already had state).
    restore_checked: bool,
    /// Whether the data directory held state before this process wrote anything.
    boot_meaningful: bool,
    /// Whether a claim ever succeeded (the worker row exists from then on).
    has_claimed: bool,
    last_activity: Instant,
    jobs_completed: u64,
    jobs_failed: u64,
}

impl Worker {
    pub fn new(config: WorkerConfig, client: WorkerClient, engine: Arc<dyn Engine>) -> Self {
        let telegram = Replier::new(&config);
        Self {
            config,
            client,
            engine,
            telegram,
            // The worker has no injected clock of the control plane; wall time only dates its
            // memory entries.
            clock: Clock::system(),
            sticky: None,
            restore_checked: false,
            boot_meaningful: false,
            has_claimed: false,
            last_activity: Instant::now(),
            jobs_completed: 0,
            jobs_failed: 0,
        }
    }

    /// Uses `clock` for the dates of memory entries.
    pub fn with_clock(mut self, clock: Clock) -> Self {
        self.clock = clock;
        self
    }

    /// Boots, serves jobs until told to stop, snapshots, and reports.
    pub async fn run(mut self, shutdown: CancellationToken) -> Result<RunOutcome, WorkerError> {
        tracing::info!(worker_id = %self.config.worker_id, engine = self.engine.name(), "worker starting");
        self.boot().await?;
        let (reason, control_reason) = self.main_loop(&shutdown).await?;
        tracing::info!(reason = reason.as_str(), control = ?control_reason, "worker stopping");
        // The engine lets go of the workspace (the OpenClaw gateway stops) before it is archived.
        self.engine.shutdown().await;
        let snapshot = self.final_snapshot(reason).await;
        Ok(RunOutcome {
            reason,
            control_reason,
            conversation_id: self.sticky.as_ref().map(|s| s.conversation_id.to_string()),
            snapshot,
            jobs_completed: self.jobs_completed,
            jobs_failed: self.jobs_failed,
        })
    }

    // ---- boot (spec §4.3) ----

    async fn boot(&mut self) -> Result<(), WorkerError> {
        for dir in [&self.config.data_dir, &self.config.state_dir, &self.config.workspace_dir] {
            tokio::fs::create_dir_all(dir)
                .await
                .map_err(|e| WorkerError::new(format!("cannot create {}: {e}", dir.display())))?;
        }
        self.boot_meaningful = workspace::is_meaningful(&self.config.state_dir, &self.config.workspace_dir);
        if let Some(conversation_id) = self.config.conversation_id.clone() {
            let sticky = ConversationId::parse(conversation_id)
                .and_then(|c| {
                    Ok(Sticky { conversation_id: c, agent_key: AgentKey::parse(self.config.agent_key.clone())? })
                })
                .map_err(|e| WorkerError::new(format!("the pre-assigned conversation: {}", e.message)))?;
            self.sticky = Some(sticky);
            self.restore_checked = true;
            if self.boot_meaningful {
                tracing::info!("data directory already holds state; no snapshot restored");
            } else {
                self.restore().await;
            }
        }
        self.prepare_workspace(self.config.skills.required).await
    }

    /// Restores the sticky conversation's newest ready snapshot. Failures are warnings: the
    /// worker can still serve the conversation, with its history but without its files.
    async fn restore(&self) -> bool {
        let Some(scope) = self.scope() else { return false };
        match self.client.restore_snapshot(&scope, &self.config.data_dir).await {
            Ok(Some((target, summary))) => {
                tracing::info!(snapshot_id = %target.snapshot_id, files = summary.files, "snapshot restored");
                true
            }
            Ok(None) => {
                tracing::info!(conversation_id = %scope.conversation_id, "no snapshot to restore");
                false
            }
            Err(e) => {
                tracing::warn!(error = %e, conversation_id = %scope.conversation_id, "snapshot restore failed");
                false
            }
        }
    }

    /// Skills and memory seeds, after any restore (a restore replaces the workspace).
    async fn prepare_workspace(&self, skills_fatal: bool) -> Result<(), WorkerError> {
        if let Err(e) = self.bootstrap_skills().await {
            if skills_fatal {
                return Err(WorkerError::new(format!("skills_bootstrap_required_failed: {e}")));
            }
            tracing::warn!(error = %e, "skills bootstrap failed; continuing without them");
        }
        let (ws, now) = (self.config.workspace_dir.clone(), self.clock.now_ms());
        match tokio::task::spawn_blocking(move || workspace::seed_memory(&ws, now)).await {
            Ok(Ok(())) => {}
            Ok(Err(e)) => tracing::warn!(error = %e, "could not seed the memory files"),
            Err(e) => tracing::warn!(error = %e, "seeding the memory files panicked"),
        }
        Ok(())
    }

    /// Fetches and materialises the global skills manifest (spec §4.3 step 6c) and records the
    /// outcome in `<state>/bootstrap/global-skills-state.json`.
    async fn bootstrap_skills(&self) -> Result<(), String> {
        let skills = &self.config.skills;
        if skills.mode == SkillsMode::Off {
            self.write_skills_state(json!({"status": "skipped"})).await;
            return Ok(());
        }
        let result = async {
            let manifest = tokio::time::timeout(
                skills.timeout,
                self.client.skills_manifest(&self.config.workspace_id, Some(&skills.release_channel)),
            )
            .await
            .map_err(|_| format!("fetching the skills manifest timed out after {} ms", skills.timeout.as_millis()))?
            .map_err(|e| format!("fetching the skills manifest: {e}"))?;
            for problem in &manifest.problems {
                tracing::warn!(problem = ?problem, "the skills manifest left a skill out");
            }
            let (dir, worker_id) = (self.config.skills_dir.clone(), self.config.worker_id.clone());
            let task =
                tokio::task::spawn_blocking(move || worker_kit::skills::materialise(&manifest, &dir, &worker_id));
            let report = tokio::time::timeout(skills.timeout, task)
                .await
                .map_err(|_| format!("materialising skills timed out after {} ms", skills.timeout.as_millis()))?
                .map_err(|e| format!("materialising skills panicked: {e}"))?
                .map_err(|e| format!("materialising skills: {e}"))?;
            for shadowed in &report.shadowed {
                tracing::warn!(dir = %shadowed, "a skill directory without marker shadows a managed skill");
            }
            if !report.failed.is_empty() {
                let failed: Vec<String> = report.failed.iter().map(|f| format!("{} ({})", f.slug, f.error)).collect();
                return Err(format!("skills failed to install: {}", failed.join("; ")));
            }
            tracing::info!(
                installed = report.installed.len(),
                unchanged = report.unchanged.len(),
                removed = report.removed.len(),
                "skills ready"
            );
            Ok(report.lock)
        }
        .await;
        match result {
            Ok(lock) => {
                self.write_skills_state(json!({"status": "ready", "lock": lock})).await;
                Ok(())
            }
            Err(e) => {
                self.write_skills_state(json!({"status": "failed", "error": e})).await;
                Err(e)
            }
        }
    }

    async fn write_skills_state(&self, mut state: Value) {
        state["updatedAt"] = json!(self.clock.now_ms());
        state["releaseChannel"] = json!(self.config.skills.release_channel);
        let path = self.config.state_dir.join("bootstrap/global-skills-state.json");
        let write = async {
            if let Some(parent) = path.parent() {
                tokio::fs::create_dir_all(parent).await?;
            }
            tokio::fs::write(&path, serde_json::to_vec_pretty(&state).unwrap_or_default()).await
        };
        if let Err(e) = write.await {
            tracing::warn!(error = %e, path = %path.display(), "could not record the skills state");
        }
    }

    // ---- main loop (spec §4.4) ----

    async fn main_loop(&mut self, shutdown: &CancellationToken) -> Result<(StopReason, Option<String>), WorkerError> {
        let mut backoff = MIN_BACKOFF;
        // Empty claims answered long before their wait ended, in a row. The first one is
        // normal (a drain releases the parked claim at once, and the control state must be read
        // right away); more mean the server refuses to park this worker (e.g. its row is bound
        // to another conversation than OPENCLAW_CONVERSATION_ID), and are paced.
        let mut instant_empty_claims = 0u32;
        self.last_activity = Instant::now();
        loop {
            if shutdown.is_cancelled() {
                return Ok((StopReason::Signal, None));
            }
            // Checked before any backend call, so a worker whose control plane is gone for good
            // still ends after its idle timeout instead of retrying forever.
            if self.last_activity.elapsed() >= self.config.idle_timeout {
                tracing::info!(idle_ms = self.config.idle_timeout.as_millis() as u64, "idle timeout reached");
                return Ok((StopReason::Manual, None));
            }
            let args = WorkerIdArgs { worker_id: self.worker() };
            let control = tokio::select! {
                biased;
                control = self.client.call::<api::GetWorkerControlState>(&args) => control,
                // A read: abandoning it is safe, and a stop must not wait for its timeout.
                () = shutdown.cancelled() => return Ok((StopReason::Signal, None)),
            };
            match control {
                Ok(control) if control.should_stop => {
                    let reason = control.reason.unwrap_or_default();
                    // A hand-started worker has no row until its first claim registers it
                    // (spec §3.4.2 step 6); only a row that went away afterwards means stop.
                    if reason == "missing_worker" && !self.has_claimed {
                        tracing::debug!("no worker row yet; the first claim registers it");
                    } else {
                        let stop = if reason == "status_draining" { StopReason::Drain } else { StopReason::Signal };
                        return Ok((stop, Some(reason)));
                    }
                }
                Ok(_) => {}
                Err(e) if is_fatal(&e) => return Err(WorkerError::new(format!("getWorkerControlState: {e}"))),
                Err(e) => {
                    tracing::warn!(error = %e, "getWorkerControlState failed; retrying");
                    if !self.pause(shutdown, &mut backoff).await {
                        return Ok((StopReason::Signal, None));
                    }
                    continue;
                }
            }

            let claim_started = Instant::now();
            let claimed = tokio::select! {
                biased;
                claimed = self.claim(self.config.claim_wait) => claimed,
                () = shutdown.cancelled() => {
                    // The parked claim is abandoned, but the server may have leased a job to it
                    // meanwhile. A 1 ms claim replaces the parked one on the server and hands
                    // back a job already leased to this worker, which is then finished.
                    if let Ok(Some(job)) = self.claim(Duration::from_millis(1)).await {
                        self.handle(job).await;
                    }
                    return Ok((StopReason::Signal, None));
                }
            };
            match claimed {
                Ok(Some(job)) => {
                    backoff = MIN_BACKOFF;
                    instant_empty_claims = 0;
                    self.last_activity = Instant::now();
                    self.handle(job).await;
                    self.last_activity = Instant::now();
                }
                Ok(None) => {
                    self.refresh_activity_if_work_pending().await;
                    if claim_started.elapsed() < self.config.claim_wait / 2 {
                        instant_empty_claims += 1;
                        if instant_empty_claims > 1 {
                            tracing::debug!("claims return at once without a job; pacing them");
                            if !self.pause(shutdown, &mut backoff).await {
                                return Ok((StopReason::Signal, None));
                            }
                        }
                    } else {
                        instant_empty_claims = 0;
                        backoff = MIN_BACKOFF;
                    }
                }
                Err(e) if is_fatal(&e) => return Err(WorkerError::new(format!("claimNextJob: {e}"))),
                Err(e) => {
                    tracing::warn!(error = %e, "claimNextJob failed; retrying");
                    if !self.pause(shutdown, &mut backoff).await {
                        return Ok((StopReason::Signal, None));
                    }
                }
            }
        }
    }

    fn worker_id(&self) -> &str {
        &self.config.worker_id
    }

    /// Sleeps `backoff` (doubling it for next time) unless stopped first; `false` when stopped.
    async fn pause(&self, shutdown: &CancellationToken, backoff: &mut Duration) -> bool {
        let wait = *backoff;
        *backoff = (*backoff * 2).min(MAX_BACKOFF);
        tokio::select! {
            () = tokio::time::sleep(wait) => true,
            () = shutdown.cancelled() => false,
        }
    }

    async fn claim(&self, wait: Duration) -> Result<Option<ClaimedJob>, OpError> {
        let args = ClaimArgs {
            worker_id: self.worker(),
            conversation_id: self.sticky.as_ref().map(|s| s.conversation_id.clone()),
            wait_ms: Some(wait.as_millis() as u64),
            now_ms: Ignored,
        };
        self.client.call::<api::ClaimNextJob>(&args).await
    }

    /// Delayed retries of the conversation count as pending work: they keep the worker from
    /// idling out (spec §4.4 step 4).
    async fn refresh_activity_if_work_pending(&mut self) {
        let Some(sticky) = &self.sticky else { return };
        let args = ConversationArgs { conversation_id: sticky.conversation_id.clone(), limit: None };
        match self.client.call::<api::HasQueuedJobsForConversation>(&args).await {
            Ok(true) => self.last_activity = Instant::now(),
            Ok(false) => {}
            Err(e) => tracing::debug!(error = %e, "hasQueuedJobsForConversation failed"),
        }
    }

    // ---- one job (spec §4.4 steps 5–8, §4.5) ----

    async fn handle(&mut self, job: ClaimedJob) {
        // Continues the message's trace (the claim carries its dispatch's context) when spans
        // are exported. Ids and counts only: never the text, the payload or a token.
        let span = tracing::info_span!("job", otel.name = "worker.job", message_id = %job.message_id,
            conversation_id = %job.conversation_id, agent_key = %job.agent_key, attempts = job.attempts);
        if let Some(traceparent) = &job.traceparent {
            common::telemetry::set_parent_from_traceparent(&span, traceparent);
        }
        let started = Instant::now();
        self.handle_in_span(job).instrument(span).await;
        metrics::histogram!(common::telemetry::WORKER_JOB_DURATION).record(started.elapsed().as_secs_f64());
    }

    async fn handle_in_span(&mut self, job: ClaimedJob) {
        self.has_claimed = true;
        tracing::info!("job claimed");
        let bound = self.sticky.clone();
        match bound {
            None => {
                self.sticky =
                    Some(Sticky { conversation_id: job.conversation_id.clone(), agent_key: job.agent_key.clone() });
            }
            Some(sticky) if sticky.conversation_id != job.conversation_id => {
                // The claim filter makes this impossible; if it happens, the job is not ours.
                let message = format!(
                    "sticky_mismatch: worker '{}' serves conversation '{}' but was handed '{}'",
                    self.config.worker_id, sticky.conversation_id, job.conversation_id
                );
                self.fail(&job, &message).await;
                return;
            }
            Some(sticky) if sticky.agent_key != job.agent_key => {
                // A conversation belongs to one agent for good, so the job is right and the
                // worker's OPENCLAW_AGENT_KEY was not.
                tracing::warn!(configured = %sticky.agent_key, actual = %job.agent_key,
                    "OPENCLAW_AGENT_KEY differs from the conversation's agent; using the conversation's");
                self.sticky = Some(Sticky { agent_key: job.agent_key.clone(), ..sticky });
            }
            Some(_) => {}
        }
        if !self.restore_checked {
            // D4: a worker that was not pre-assigned learns its conversation only now, and
            // restores it before touching the job.
            self.restore_checked = true;
            if !self.boot_meaningful && self.restore().await {
                // The restore replaced the workspace: re-install skills and memory seeds.
                let _ = self.prepare_workspace(false).await;
            }
        }

        let lease_lost = Arc::new(AtomicBool::new(false));
        let heartbeat = self.start_heartbeat(&job, lease_lost.clone());
        let result = self.process(&job, &lease_lost).await;
        heartbeat.cancel();
        match result {
            Ok(()) => self.complete(&job).await,
            Err(message) => self.fail(&job, &message).await,
        }
    }

    /// Extends the lease every `HEARTBEAT_INTERVAL_MS` until cancelled; a refused heartbeat
    /// (the lease moved on) sets `lease_lost` so no further side effect is attempted.
    fn start_heartbeat(&self, job: &ClaimedJob, lease_lost: Arc<AtomicBool>) -> CancellationToken {
        let stop = CancellationToken::new();
        let (client, interval, token) = (self.client.clone(), self.config.heartbeat_interval, stop.clone());
        let args = self.lease_args(job);
        tokio::spawn(async move {
            let mut ticks = tokio::time::interval_at(Instant::now() + interval, interval);
            ticks.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
            loop {
                tokio::select! {
                    () = token.cancelled() => return,
                    _ = ticks.tick() => {}
                }
                match client.call::<api::HeartbeatJob>(&args).await {
                    Ok(true) => tracing::debug!("lease extended"),
                    Ok(false) => {
                        tracing::warn!("heartbeat refused: the lease moved on");
                        lease_lost.store(true, Ordering::SeqCst);
                        return;
                    }
                    Err(e) => tracing::warn!(error = %e, "heartbeat failed"),
                }
            }
        });
        stop
    }

    /// Everything between claim and completion. `Err` carries the message `failJob` records.
    async fn process(&self, job: &ClaimedJob, lease_lost: &AtomicBool) -> Result<(), String> {
        let args = BundleArgs {
            message_id: job.message_id.clone(),
            workspace_id: Ignored,
            conversation_id: Some(job.conversation_id.clone()),
        };
        let bundle = self
            .client
            .call::<api::GetHydrationBundleForClaimedJob>(&args)
            .instrument(tracing::info_span!("hydrate", otel.name = "worker.hydrate"))
            .await
            .map_err(|e| format!("getHydrationBundleForClaimedJob: {e}"))?
            .ok_or_else(|| {
                format!(
                    "no hydration bundle for job '{}': it is not processing under a lease, or its conversation or \
                     agent profile is missing",
                    job.message_id
                )
            })?;
        let payload = &Value::Object(bundle.payload);

        // R2: only Telegram jobs need a bot token, and its absence fails the job before any
        // side effect.
        let telegram_target = if payload.get("provider").and_then(Value::as_str) == Some("telegram") {
            let token = bundle
                .telegram_bot_token
                .as_deref()
                .map(str::trim)
                .filter(|t| !t.is_empty())
                .ok_or("Bot not paired: missing telegram token in hydration bundle")?;
            let chat_id = telegram::reply_chat_id(payload)
                .ok_or("telegram job without a chat id (metadata.telegramChatId or providerUserId)")?;
            Some((token.to_string(), chat_id))
        } else {
            None
        };

        let state_dir = &self.config.state_dir;
        let mut journal = Journal::load(state_dir, &job.message_id);
        let save = |journal: &Journal| {
            if let Err(e) = journal.save(state_dir, &job.message_id) {
                tracing::warn!(error = %e, "could not write the job journal");
            }
        };

        let (user_text, reply) = match (journal.user_text.clone(), journal.reply.clone()) {
            (Some(user_text), Some(reply)) => {
                tracing::info!("reusing the reply of an earlier attempt");
                (user_text, reply)
            }
            _ => {
                let (user_text, files) = self.user_text_with_media(job, payload).await;
                let engine_job = EngineJob {
                    message_id: job.message_id.to_string(),
                    conversation_id: job.conversation_id.to_string(),
                    agent_key: job.agent_key.to_string(),
                    workspace_id: self.config.workspace_id.clone(),
                    text: user_text.clone(),
                    history: bundle.conversation_state.context_history.clone(),
                    payload: payload.clone(),
                    attachments: files,
                    workspace_dir: self.config.workspace_dir.clone(),
                    model: bundle.model_runtime_config.clone(),
                };
                let reply = self
                    .engine
                    .reply(&engine_job)
                    .instrument(tracing::info_span!("engine", otel.name = "worker.engine", engine = self.engine.name()))
                    .await
                    .map_err(|e| e.to_string())?;
                if reply.trim().is_empty() {
                    return Err(format!("the {} engine returned an empty reply", self.engine.name()));
                }
                journal.user_text = Some(user_text.clone());
                journal.reply = Some(reply.clone());
                save(&journal);
                (user_text, reply)
            }
        };

        if lease_lost.load(Ordering::SeqCst) {
            return Err("the lease moved on while processing; side effects skipped".to_string());
        }
        // Media lines leave the text; history and memory keep what the user gets.
        let reply = Reply::parse(&reply);
        let transcript = reply.transcript();
        if !journal.memory_recorded {
            self.record_memory(job, &user_text, &transcript).await;
            journal.memory_recorded = true;
            save(&journal);
        }
        if !journal.history_appended {
            let item = |role, content: &str| NewHistoryItem { role, content: content.to_string(), at: None };
            let args = AppendMessagesArgs {
                conversation_id: job.conversation_id.clone(),
                workspace_id: Some(self.config.workspace_id.clone()),
                messages: vec![item(HistoryRole::User, &user_text), item(HistoryRole::Assistant, &transcript)],
                now_ms: Ignored,
            };
            self.client
                .call::<api::AppendConversationMessages>(&args)
                .instrument(tracing::info_span!("history", otel.name = "worker.history"))
                .await
                .map_err(|e| format!("appendConversationMessages: {e}"))?;
            journal.history_appended = true;
            save(&journal);
        }
        if let Some((token, chat_id)) = telegram_target {
            let span = tracing::info_span!("reply", otel.name = "worker.reply", provider = "telegram");
            async {
                for step in reply.steps().iter().skip(journal.telegram_sent) {
                    if lease_lost.load(Ordering::SeqCst) {
                        return Err("the lease moved on while replying; remaining messages not sent".to_string());
                    }
                    self.telegram.send(&token, &chat_id, step).await.map_err(|e| e.to_string())?;
                    journal.telegram_sent += 1;
                    save(&journal);
                }
                Ok(())
            }
            .instrument(span)
            .await?;
        }
        Ok(())
    }

    /// The message text plus a `[telegram_media]` block naming the downloaded attachments
    /// (spec §4.5 steps 1–2), and their workspace-relative paths.
    async fn user_text_with_media(&self, job: &ClaimedJob, payload: &Value) -> (String, Vec<String>) {
        let text = payload.get("messageText").and_then(Value::as_str).unwrap_or_default().to_string();
        let listed: Vec<BundleAttachment> = match payload.get("attachments") {
            None | Some(Value::Null) => Vec::new(),
            Some(value) => serde_json::from_value(value.clone()).unwrap_or_else(|e| {
                tracing::warn!(error = %e, "attachments of the payload are unreadable; ignoring them");
                Vec::new()
            }),
        };
        if listed.is_empty() {
            return (text, Vec::new());
        }
        let results = attachments::download_all(
            self.client.http(),
            self.client.token(),
            &job.message_id,
            &listed,
            &self.config.workspace_dir,
            self.config.attachment_max_bytes,
        )
        .await;
        let downloaded: Vec<_> = results.into_iter().filter_map(Result::ok).collect();
        if downloaded.is_empty() {
            return (text, Vec::new());
        }
        let lines: Vec<&str> = downloaded.iter().map(|d| d.description_line.as_str()).collect();
        let files = downloaded.iter().map(|d| d.relative_path.to_string_lossy().into_owned()).collect();
        let text = if text.trim().is_empty() {
            format!("[telegram_media]\n{}", lines.join("\n"))
        } else {
            format!("{text}\n\n[telegram_media]\n{}", lines.join("\n"))
        };
        (text, files)
    }

    async fn record_memory(&self, job: &ClaimedJob, user_text: &str, reply: &str) {
        let ws = self.config.workspace_dir.clone();
        let (now_ms, conversation_id, agent_key) =
            (self.clock.now_ms(), job.conversation_id.clone(), job.agent_key.clone());
        let (user_text, reply) = (user_text.to_string(), reply.to_string());
        let task = tokio::task::spawn_blocking(move || {
            let entry = MemoryEntry {
                now_ms,
                conversation_id: &conversation_id,
                agent_key: &agent_key,
                user_text: &user_text,
                reply: &reply,
            };
            workspace::record_memory(&ws, &entry)
        });
        match task.await {
            Ok(Ok(())) => {}
            Ok(Err(e)) => tracing::warn!(error = %e, "could not write the memory entry"),
            Err(e) => tracing::warn!(error = %e, "writing the memory entry panicked"),
        }
    }

    /// This worker's id as the contracts carry it; the server validates it.
    fn worker(&self) -> WorkerId {
        WorkerId::trusted(self.worker_id())
    }

    fn lease_args(&self, job: &ClaimedJob) -> LeaseArgs {
        LeaseArgs {
            worker_id: self.worker(),
            message_id: job.message_id.clone(),
            lease_id: job.lease_id.clone(),
            now_ms: Ignored,
            provider_config: Ignored,
        }
    }

    async fn complete(&mut self, job: &ClaimedJob) {
        let span = tracing::info_span!("complete", otel.name = "worker.complete");
        match self.client.call::<api::CompleteJob>(&self.lease_args(job)).instrument(span).await {
            Ok(true) => {
                metrics::counter!(common::telemetry::WORKER_JOBS, "outcome" => "completed").increment(1);
                self.jobs_completed += 1;
                Journal::remove(&self.config.state_dir, &job.message_id);
                tracing::info!("job completed");
            }
            // The journal stays: if the job comes back, its side effects are not repeated.
            Ok(false) => tracing::warn!("completeJob refused: the lease moved on"),
            Err(e) => tracing::warn!(error = %e, "completeJob failed; the lease will expire and the job return"),
        }
    }

    async fn fail(&mut self, job: &ClaimedJob, message: &str) {
        tracing::warn!(error = %message, "job failed");
        self.jobs_failed += 1;
        metrics::counter!(common::telemetry::WORKER_JOBS, "outcome" => "failed").increment(1);
        let args = FailArgs {
            worker_id: self.worker(),
            message_id: job.message_id.clone(),
            lease_id: job.lease_id.clone(),
            error_message: message.to_string(),
            now_ms: Ignored,
            provider_config: Ignored,
        };
        match self
            .client
            .call::<api::FailJob>(&args)
            .instrument(tracing::info_span!("fail", otel.name = "worker.fail"))
            .await
        {
            Ok(result) => {
                if result.dead_lettered {
                    Journal::remove(&self.config.state_dir, &job.message_id);
                }
                tracing::info!(?result, "failure recorded");
            }
            Err(e) => tracing::warn!(error = %e, "failJob failed; the lease will expire and the job return"),
        }
    }

    // ---- shutdown ----

    fn scope(&self) -> Option<SnapshotScope> {
        self.sticky.as_ref().map(|s| SnapshotScope {
            workspace_id: self.config.workspace_id.clone(),
            agent_key: s.agent_key.to_string(),
            conversation_id: s.conversation_id.to_string(),
        })
    }

    /// Uploads the workspace as the conversation's snapshot; failures are logged (the
    /// scheduler's drain deadline covers a worker that cannot snapshot).
    async fn final_snapshot(&self, reason: StopReason) -> Option<UploadedSnapshot> {
        let Some(scope) = self.scope() else {
            tracing::info!("no conversation known; no snapshot");
            return None;
        };
        let started = Instant::now();
        match self.client.upload_snapshot(&self.config.data_dir, &scope, reason.as_str()).await {
            Ok(uploaded) => {
                metrics::histogram!(common::telemetry::WORKER_SNAPSHOT_DURATION)
                    .record(started.elapsed().as_secs_f64());
                metrics::histogram!(common::telemetry::WORKER_SNAPSHOT_BYTES).record(uploaded.size_bytes as f64);
                tracing::info!(snapshot_id = %uploaded.snapshot_id, size_bytes = uploaded.size_bytes,
                    reason = reason.as_str(), "snapshot uploaded");
                Some(uploaded)
            }
            Err(e) => {
                tracing::warn!(error = %e, reason = reason.as_str(), "shutdown snapshot failed");
                None
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use std::collections::HashMap;

    use super::*;

    fn config(api_url: &str, data: &std::path::Path, idle_ms: &str) -> WorkerConfig {
        let env: HashMap<String, String> = [
            ("WORKER_ID", "w-1"),
            ("AF_WORKER_TOKEN", "t"),
            ("AF_API_URL", api_url),
            ("OPENCLAW_DATA_DIR", &data.display().to_string()),
            ("WORKER_IDLE_TIMEOUT_MS", idle_ms),
            ("SKILLS_BOOTSTRAP_MODE", "off"),
        ]
        .iter()
        .map(|(k, v)| (k.to_string(), v.to_string()))
        .collect();
        WorkerConfig::from_env(&env).unwrap()
    }

    #[tokio::test]
    async fn a_worker_whose_control_plane_is_gone_still_idles_out() {
        let data = tempfile::tempdir().unwrap();
        // Nothing listens on the discard port: every call fails at once.
        let run = run(config("http://127.0.0.1:9", data.path(), "300"), CancellationToken::new());
        let outcome = tokio::time::timeout(Duration::from_secs(20), run).await.unwrap().unwrap();
        assert_eq!(outcome.reason, StopReason::Manual);
        assert_eq!((outcome.snapshot, outcome.conversation_id), (None, None));
        assert!(data.path().join("workspace/MEMORY.md").is_file(), "the workspace was prepared");
    }

    #[tokio::test]
    async fn a_stop_signal_does_not_wait_for_a_hanging_backend_call() {
        // A backend that accepts connections and never answers.
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let url = format!("http://{}", listener.local_addr().unwrap());
        let (accepted_tx, mut accepted) = tokio::sync::mpsc::unbounded_channel();
        tokio::spawn(async move {
            let mut held = Vec::new();
            while let Ok((socket, _)) = listener.accept().await {
                held.push(socket);
                let _ = accepted_tx.send(());
            }
        });
        let data = tempfile::tempdir().unwrap();
        let shutdown = CancellationToken::new();
        let handle = tokio::spawn(run(config(&url, data.path(), "3600000"), shutdown.clone()));
        accepted.recv().await.unwrap(); // The control-state call is in flight.
        shutdown.cancel();
        let outcome = tokio::time::timeout(Duration::from_secs(5), handle).await.unwrap().unwrap().unwrap();
        assert_eq!(outcome.reason, StopReason::Signal);
    }

    #[test]
    fn retryable_messages_follow_the_spec_pattern() {
        for m in [
            "request timeout",
            "'claimNextJob' timed out",
            "network down",
            "HTTP 429",
            "answered 503 Service",
            "cannot connect to NATS",
            "no queue leader: unavailable",
        ] {
            assert!(looks_retryable(m), "{m}");
        }
        for m in [
            "AF_WORKER_TOKEN is required",
            "forbidden: worker token for w2",
            "port 5000 refused by policy",
            "skills_bootstrap_required_failed: bad checksum",
        ] {
            assert!(!looks_retryable(m), "{m}");
        }
        assert_eq!(WorkerError::new("HTTP 502").exit_code(), 1);
        assert_eq!(WorkerError::new("unauthenticated").exit_code(), 2);
    }
}
