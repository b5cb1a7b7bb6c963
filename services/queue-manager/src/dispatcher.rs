//! The queue leader's dispatcher: one event loop that owns an in-memory index of every
//! conversation's pending jobs, lease and owner, and of every worker row. It is rebuilt from
//! JetStream when leadership is won (queue state and worker rows from KV, pending jobs by
//! replaying the inbox from the stored watermark) and kept current by tailing the inbox.
//!
//! Invariants (see docs/architecture.md):
//! - a job is handed to a worker only after the lease is durably written with a CAS on the
//!   conversation's queue-state revision, which is also the fencing token: a stale leader's next
//!   write to that conversation fails;
//! - at most one write per conversation is in flight; operations on a conversation that is being
//!   written wait for it (`deferred`), so the index never runs ahead of what is stored;
//! - only a conversation's first unfinished job (its head) can be leased, which gives strict
//!   FIFO per conversation (a job waiting for its retry holds back later ones);
//! - a free worker takes the best eligible unowned conversation from an ordered set, however
//!   many locked or owned conversations exist (no head-of-line blocking).

use std::cmp::Reverse;
use std::collections::{BTreeSet, HashMap, HashSet, VecDeque};
use std::sync::Arc;
use std::time::Duration;

use common::OpError;
use common::clock::Millis;
use common::model::{Assignment, WorkerRow, WorkerStatus};
use common::service::ServiceContext;
use common::store::{StoreError, Versioned};
use futures::StreamExt;
use serde_json::Value;
use tokio::sync::{mpsc, oneshot, watch};
use tokio_util::sync::CancellationToken;

use crate::model::*;
use crate::workers;

/// Key of the replay watermark in `af_queue_state`. `escape` never yields `=w`, so it cannot
/// collide with a conversation token.
const WATERMARK_KEY: &str = "=watermark";
const LEASE_EXPIRED_ERROR: &str = "Lease expired while processing";
const MAX_ERROR_BYTES: usize = 4096;
const MAX_LIST: usize = 1000;

pub type Reply = oneshot::Sender<Result<Value, OpError>>;

/// An operation routed to the leader.
pub enum Command {
    Claim {
        args: ClaimArgs,
        reply: Reply,
    },
    Heartbeat {
        args: LeaseArgs,
        reply: Reply,
    },
    Complete {
        args: LeaseArgs,
        reply: Reply,
    },
    Fail {
        args: FailArgs,
        reply: Reply,
    },
    Release {
        limit: usize,
        reply: Option<Reply>,
    },
    Stats {
        reply: Reply,
    },
    ListJobs {
        args: ListJobsArgs,
        reply: Reply,
    },
    ListConversation {
        args: ConversationArgs,
        reply: Reply,
    },
    HasQueued {
        conversation_id: String,
        reply: Reply,
    },
    ControlState {
        worker_id: String,
        reply: Reply,
    },
    WorkerStats {
        reply: Reply,
    },
    ListWorkers {
        reply: Reply,
    },
    UpsertWorker {
        args: Box<UpsertWorkerArgs>,
        reply: Reply,
    },
    RequeueDeadLetter {
        message_id: String,
        reply: Reply,
    },
    PurgeDeadLetter {
        message_id: String,
        reply: Reply,
    },
    WorkerOf {
        worker_id: String,
        reply: oneshot::Sender<Option<WorkerRow>>,
    },
    /// Answers once every inbox message up to `seq` has been indexed.
    Barrier {
        seq: u64,
        reply: oneshot::Sender<()>,
    },
}

enum Event {
    Command(Command),
    Inbox {
        seq: u64,
        token: String,
        job: Arc<Job>,
    },
    ConvWritten {
        token: String,
        result: Result<u64, StoreError>,
        state: QueueState,
        after: After,
    },
    ConvReloaded {
        token: String,
        result: Result<Option<Versioned<QueueState>>, StoreError>,
    },
    WorkerWritten {
        worker_id: String,
        result: Result<u64, StoreError>,
    },
    WorkerReloaded {
        worker_id: String,
        revision: Option<u64>,
    },
    ParkExpired {
        worker_id: String,
        park_id: u64,
    },
    DeadLetterRemoved {
        message_id: String,
    },
    WatermarkWritten {
        watermark: u64,
        revision: Option<u64>,
        ok: bool,
    },
}

/// What to do once a conversation write is acknowledged.
enum After {
    Claim {
        worker_id: String,
        reply: Reply,
        args: ClaimArgs,
    },
    Heartbeat {
        worker_id: String,
        reply: Reply,
    },
    Complete {
        worker_id: String,
        reply: Reply,
    },
    Fail {
        worker_id: String,
        reply: Reply,
        outcome: FailOutcome,
    },
    Recover {
        worker_id: String,
        dead: bool,
        batch: Option<u64>,
    },
}

/// A cheap handle to the running dispatcher.
#[derive(Clone)]
pub struct Dispatcher {
    tx: mpsc::Sender<Event>,
}

impl Dispatcher {
    pub async fn send(&self, command: Command) -> Result<(), OpError> {
        self.tx
            .send(Event::Command(command))
            .await
            .map_err(|_| OpError::unavailable("the queue leader is stepping down; retry"))
    }

    /// Sends a command built around a reply channel and waits for the answer.
    pub async fn ask(&self, make: impl FnOnce(Reply) -> Command) -> Result<Value, OpError> {
        let (tx, rx) = oneshot::channel();
        self.send(make(tx)).await?;
        rx.await
            .map_err(|_| OpError::unavailable("the queue leader stepped down; retry"))?
    }

    /// Read-your-writes: waits until the index has seen every message the inbox held when
    /// this was called, so a claim or read right after an enqueue sees that enqueue.
    pub async fn barrier(&self, js: &async_nats::jetstream::Context) -> Result<(), OpError> {
        let seq = crate::enqueue::inbox(js).await?.cached_info().state.last_sequence;
        let (tx, rx) = oneshot::channel();
        self.send(Command::Barrier { seq, reply: tx }).await?;
        rx.await
            .map_err(|_| OpError::unavailable("the queue leader stepped down; retry"))
    }

    /// Rebuilds the index from JetStream and runs the loop until `leadership` is cancelled.
    /// `ready` flips to true once the inbox replay has caught up.
    pub async fn start(
        ctx: ServiceContext,
        leadership: CancellationToken,
        ready: watch::Sender<bool>,
    ) -> anyhow::Result<(Self, tokio::task::JoinHandle<()>)> {
        let (tx, rx) = mpsc::channel(65_536);
        let mut state = Box::new(Box::pin(State::load(ctx.clone())).await?);
        let start_seq = state.watermark.max(1);
        let stream = crate::enqueue::inbox(&ctx.js)
            .await
            .map_err(|e| anyhow::anyhow!(e.message))?;
        let last_seq = stream.cached_info().state.last_sequence;
        state.caught_up_at = last_seq;
        tracing::info!(
            conversations = state.convs.len(),
            workers = state.workers.len(),
            replay_from = start_seq,
            replay_to = last_seq,
            "queue index loaded; replaying inbox"
        );
        let consumer = stream
            .create_consumer(async_nats::jetstream::consumer::push::OrderedConfig {
                deliver_subject: ctx.nats.new_inbox(),
                deliver_policy: async_nats::jetstream::consumer::DeliverPolicy::ByStartSequence {
                    start_sequence: start_seq,
                },
                ..Default::default()
            })
            .await?;
        let mut messages = consumer.messages().await?;
        let tail_tx = tx.clone();
        let tail_stop = leadership.clone();
        tokio::spawn(async move {
            loop {
                let next = tokio::select! {
                    _ = tail_stop.cancelled() => return,
                    next = messages.next() => next,
                };
                let Some(Ok(msg)) = next else {
                    tracing::error!("inbox tail ended; giving up leadership");
                    tail_stop.cancel();
                    return;
                };
                let Ok(info) = msg.info() else { continue };
                let seq = info.stream_sequence;
                let token = msg.subject.as_str().rsplit('.').next().unwrap_or_default().to_string();
                match serde_json::from_slice::<Job>(&msg.payload) {
                    Ok(job) => {
                        if tail_tx
                            .send(Event::Inbox {
                                seq,
                                token,
                                job: Arc::new(job),
                            })
                            .await
                            .is_err()
                        {
                            return;
                        }
                    }
                    Err(e) => tracing::error!(seq, error = %e, "undecodable inbox message skipped"),
                }
            }
        });
        state.tx = Some(tx.clone());
        state.ready = Some(ready);
        if last_seq < start_seq {
            state.mark_caught_up();
        }
        let handle = tokio::spawn(Box::pin(state.run(rx, leadership)));
        Ok((Self { tx }, handle))
    }
}

#[derive(Clone)]
struct Pending {
    seq: u64,
    job: Arc<Job>,
}

struct Conv {
    conversation_id: String,
    agent_key: String,
    state: QueueState,
    revision: Option<u64>,
    pending: VecDeque<Pending>,
    writing: bool,
    deferred: VecDeque<Command>,
}

impl Conv {
    fn head(&self) -> Option<&HeadState> {
        let first = self.pending.front()?;
        self.state.head.as_ref().filter(|h| h.seq == first.seq)
    }

    fn lease(&self) -> Option<&Lease> {
        self.head().and_then(|h| h.lease.as_ref())
    }

    /// When the head becomes claimable, or `None` if it is leased, being written, or absent.
    fn eligible_at(&self) -> Option<Millis> {
        if self.writing {
            return None;
        }
        let first = self.pending.front()?;
        let head = self.head();
        if head.is_some_and(|h| h.lease.is_some()) {
            return None;
        }
        Some(
            first
                .job
                .scheduled_for
                .max(head.and_then(|h| h.not_before).unwrap_or(Millis::MIN)),
        )
    }
}

struct WorkerEntry {
    row: WorkerRow,
    revision: Option<u64>,
    writing: bool,
    dirty: bool,
    waiters: Vec<Reply>,
}

struct Parked {
    park_id: u64,
    args: ClaimArgs,
    reply: Reply,
}

/// Order of unowned eligible conversations: priority desc, eligible time asc, sequence asc.
type ReadyKey = (Reverse<i64>, Millis, u64, String);

struct ReleaseBatch {
    outcome: ReleaseOutcome,
    remaining: usize,
    reply: Option<Reply>,
}

struct State {
    ctx: ServiceContext,
    tx: Option<mpsc::Sender<Event>>,
    convs: HashMap<String, Conv>,
    by_message: HashMap<String, (String, u64)>,
    workers: HashMap<String, WorkerEntry>,
    /// Conversation token → the worker that last took (or was assigned) it.
    owner_of: HashMap<String, String>,
    ready_set: BTreeSet<ReadyKey>,
    ready_key: HashMap<String, ReadyKey>,
    timers: BTreeSet<(Millis, String)>,
    timer_of: HashMap<String, Millis>,
    /// Leased conversations by lease expiry, for recovery.
    leased: BTreeSet<(Millis, String)>,
    parked: HashMap<String, Parked>,
    free_parked: VecDeque<(String, u64)>,
    next_park_id: u64,
    dead_letters: HashSet<String>,
    batches: HashMap<u64, ReleaseBatch>,
    next_batch: u64,
    watermark: u64,
    watermark_revision: Option<u64>,
    watermark_writing: bool,
    last_seq: u64,
    caught_up_at: u64,
    ready: Option<watch::Sender<bool>>,
    barriers: Vec<(u64, oneshot::Sender<()>)>,
    /// Set once the inbox replay has caught up; nothing is handed out before.
    serving: bool,
    next_sweep: Option<Millis>,
}

impl State {
    async fn load(ctx: ServiceContext) -> anyhow::Result<Self> {
        let b = &ctx.buckets;
        let mut workers = HashMap::new();
        for (_, v) in b.workers.all::<WorkerRow>().await? {
            let row = v.value;
            workers.insert(
                row.worker_id.clone(),
                WorkerEntry {
                    row,
                    revision: Some(v.revision),
                    writing: false,
                    dirty: false,
                    waiters: Vec::new(),
                },
            );
        }
        let mut convs = HashMap::new();
        let mut watermark = 1;
        let mut watermark_revision = None;
        for (key, v) in b.queue_state.all::<Value>().await? {
            if key == WATERMARK_KEY {
                watermark = v.value.as_u64().unwrap_or(1);
                watermark_revision = Some(v.revision);
                continue;
            }
            let state: QueueState = serde_json::from_value(v.value)?;
            convs.insert(
                key.clone(),
                Conv {
                    conversation_id: state.conversation_id.clone(),
                    agent_key: state.agent_key.clone(),
                    state,
                    revision: Some(v.revision),
                    pending: VecDeque::new(),
                    writing: false,
                    deferred: VecDeque::new(),
                },
            );
        }
        let dead_letters: HashSet<String> = b.dead_letters.keys().await?.into_iter().collect();
        let mut owner_of = HashMap::new();
        let mut by_time: Vec<(&WorkerEntry, Millis)> = workers
            .values()
            .filter_map(|w| w.row.assignment.as_ref().map(|a| (w, a.assigned_at)))
            .collect();
        by_time.sort_by_key(|(_, t)| *t);
        for (w, _) in by_time {
            if let Some(a) = &w.row.assignment {
                owner_of.insert(common::token::escape(&a.conversation_id), w.row.worker_id.clone());
            }
        }
        let auto = ctx.settings.loops.enabled(ctx.settings.loops.lease_recovery);
        let next_sweep = auto.then(|| ctx.clock.now_ms() + ctx.settings.loops.lease_recovery_interval_ms as i64);
        Ok(Self {
            ctx,
            tx: None,
            convs,
            by_message: HashMap::new(),
            workers,
            owner_of,
            ready_set: BTreeSet::new(),
            ready_key: HashMap::new(),
            timers: BTreeSet::new(),
            timer_of: HashMap::new(),
            leased: BTreeSet::new(),
            parked: HashMap::new(),
            free_parked: VecDeque::new(),
            next_park_id: 0,
            dead_letters,
            batches: HashMap::new(),
            next_batch: 0,
            watermark,
            watermark_revision,
            watermark_writing: false,
            last_seq: watermark.saturating_sub(1),
            caught_up_at: 0,
            ready: None,
            barriers: Vec::new(),
            serving: false,
            next_sweep,
        })
    }

    fn now(&self) -> Millis {
        self.ctx.clock.now_ms()
    }

    fn q(&self) -> &common::config::QueueSettings {
        &self.ctx.settings.queue
    }

    fn send_later(&self, event: impl std::future::Future<Output = Event> + Send + 'static) {
        if let Some(tx) = self.tx.clone() {
            tokio::spawn(async move {
                let _ = tx.send(event.await).await;
            });
        }
    }

    async fn run(mut self: Box<Self>, mut rx: mpsc::Receiver<Event>, leadership: CancellationToken) {
        let clock = self.ctx.clock.clone();
        let mut flush = tokio::time::interval(Duration::from_secs(1));
        flush.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            let next_timer = [self.timers.first().map(|(t, _)| *t), self.next_sweep]
                .into_iter()
                .flatten()
                .min();
            tokio::select! {
                biased;
                _ = leadership.cancelled() => break,
                event = rx.recv() => match event {
                    Some(event) => self.handle(event),
                    None => break,
                },
                _ = clock.sleep_until(next_timer.unwrap_or(Millis::MAX)), if next_timer.is_some() => self.fire_timers(),
                _ = clock.changed() => self.fire_timers(),
                _ = flush.tick() => self.flush_lazy(),
            }
        }
        // Parked long polls end empty so workers retry against the next leader.
        for (_, parked) in self.parked.drain() {
            let _ = parked.reply.send(Ok(Value::Null));
        }
        tracing::info!("queue dispatcher stopped");
    }

    fn mark_caught_up(&mut self) {
        if self.serving {
            return;
        }
        self.serving = true;
        let tokens: Vec<String> = self.convs.keys().cloned().collect();
        // Load is derived from the leases: the persisted value may predate the last change.
        for w in self.workers.values_mut() {
            if w.row.load != 0 {
                w.row.load = 0;
                w.dirty = true;
            }
        }
        for token in &tokens {
            self.reconcile_loaded(token);
        }
        for token in &tokens {
            self.evaluate(token);
        }
        if let Some(ready) = &self.ready {
            let _ = ready.send(true);
        }
        tracing::info!(conversations = self.convs.len(), "queue index caught up; serving");
    }

    /// After replay: drop a head that points at a message that no longer exists, and index
    /// the lease.
    fn reconcile_loaded(&mut self, token: &str) {
        let Some(conv) = self.convs.get_mut(token) else {
            return;
        };
        let first = conv.pending.front().map(|p| p.seq);
        if conv.state.head.as_ref().is_some_and(|h| Some(h.seq) != first) {
            tracing::warn!(conversation = %conv.conversation_id, "queue head refers to a missing message; dropped");
            conv.state.head = None;
        }
        if let Some(lease) = conv.lease() {
            self.leased.insert((lease.expires_at, token.to_string()));
            let (worker, conversation_id, agent_key, lease_id) = (
                lease.worker_id.clone(),
                conv.conversation_id.clone(),
                conv.agent_key.clone(),
                lease.lease_id.clone(),
            );
            self.owner_of.insert(token.to_string(), worker.clone());
            if let Some(w) = self.workers.get_mut(&worker) {
                w.row.load += 1;
                w.dirty = true;
                if w.row
                    .assignment
                    .as_ref()
                    .is_none_or(|a| a.conversation_id != conversation_id)
                {
                    w.row.assignment = Some(Assignment {
                        conversation_id,
                        agent_key,
                        lease_id,
                        assigned_at: w.row.heartbeat_at,
                    });
                    w.dirty = true;
                }
            }
        }
    }

    fn handle(&mut self, event: Event) {
        match event {
            Event::Command(command) => self.command(command),
            Event::Inbox { seq, token, job } => self.on_inbox(seq, token, job),
            Event::ConvWritten {
                token,
                result,
                state,
                after,
            } => self.on_conv_written(token, result, state, after),
            Event::ConvReloaded { token, result } => self.on_conv_reloaded(token, result),
            Event::WorkerWritten { worker_id, result } => self.on_worker_written(worker_id, result),
            Event::WorkerReloaded { worker_id, revision } => {
                if let Some(w) = self.workers.get_mut(&worker_id) {
                    w.revision = revision;
                    w.writing = false;
                    w.dirty = true;
                }
                self.flush_worker(&worker_id);
            }
            Event::ParkExpired { worker_id, park_id } => {
                if self.parked.get(&worker_id).is_some_and(|p| p.park_id == park_id)
                    && let Some(p) = self.parked.remove(&worker_id)
                {
                    let _ = p.reply.send(Ok(Value::Null));
                }
            }
            Event::DeadLetterRemoved { message_id } => {
                self.dead_letters.remove(&message_id);
            }
            Event::WatermarkWritten {
                watermark,
                revision,
                ok,
            } => {
                self.watermark_writing = false;
                self.watermark_revision = revision;
                if ok {
                    self.watermark = watermark;
                }
            }
        }
    }

    fn on_inbox(&mut self, seq: u64, token: String, job: Arc<Job>) {
        self.last_seq = self.last_seq.max(seq);
        if !self.barriers.is_empty() {
            let last = self.last_seq;
            for (_, reply) in self.barriers.extract_if(.., |(s, _)| *s <= last) {
                let _ = reply.send(());
            }
        }
        let conv = self.convs.entry(token.clone()).or_insert_with(|| Conv {
            conversation_id: job.conversation_id.clone(),
            agent_key: job.agent_key.clone(),
            state: QueueState {
                conversation_id: job.conversation_id.clone(),
                agent_key: job.agent_key.clone(),
                done_seq: 0,
                head: None,
                last_completed: None,
            },
            revision: None,
            pending: VecDeque::new(),
            writing: false,
            deferred: VecDeque::new(),
        });
        if seq > conv.state.done_seq && conv.pending.back().is_none_or(|p| p.seq < seq) {
            self.by_message.insert(job.message_id.clone(), (token.clone(), seq));
            conv.pending.push_back(Pending { seq, job });
        }
        let caught_up = self.serving;
        if caught_up {
            if self.convs.get(&token).is_some_and(|c| c.pending.len() == 1) {
                self.evaluate(&token);
            }
        } else if seq >= self.caught_up_at {
            self.mark_caught_up();
        }
    }

    // ----- dispatch -------------------------------------------------------------------------

    fn unindex(&mut self, token: &str) {
        if let Some(key) = self.ready_key.remove(token) {
            self.ready_set.remove(&key);
        }
        if let Some(t) = self.timer_of.remove(token) {
            self.timers.remove(&(t, token.to_string()));
        }
    }

    fn set_timer(&mut self, token: &str, at: Millis) {
        self.timer_of.insert(token.to_string(), at);
        self.timers.insert((at, token.to_string()));
    }

    /// The live sticky owner of a conversation, if any.
    fn fresh_owner(&self, token: &str, conversation_id: &str) -> Option<&WorkerRow> {
        let worker = self.owner_of.get(token)?;
        let row = &self.workers.get(worker)?.row;
        workers::is_fresh_owner(row, conversation_id, self.now(), self.q().stale_after_ms).then_some(row)
    }

    /// Re-files a conversation after anything about it changed: hands it to a waiting worker,
    /// files it as ready, or sets a timer for when that may change.
    fn evaluate(&mut self, token: &str) {
        self.unindex(token);
        if !self.serving {
            return;
        }
        let Some(conv) = self.convs.get(token) else {
            return;
        };
        let Some(at) = conv.eligible_at() else { return };
        let now = self.now();
        if at > now {
            self.set_timer(token, at);
            return;
        }
        let conversation_id = conv.conversation_id.clone();
        if let Some(owner) = self.fresh_owner(token, &conversation_id) {
            let owner_id = owner.worker_id.clone();
            let stale_at = owner.heartbeat_at + self.q().stale_after_ms;
            if self.parked.contains_key(&owner_id) {
                self.take_parked(&owner_id, token);
            } else {
                // The owner gets it when it asks; others may take over once it goes stale.
                self.set_timer(token, stale_at);
            }
            return;
        }
        // A parked worker that asked for exactly this conversation.
        let filtered = self
            .parked
            .iter()
            .find(|(id, p)| {
                p.args.conversation_id.as_deref() == Some(conversation_id.as_str())
                    && self.workers.get(*id).is_none_or(|w| w.row.assignment.is_none())
            })
            .map(|(id, _)| id.clone());
        if let Some(worker) = filtered {
            self.take_parked(&worker, token);
            return;
        }
        while let Some((worker, park_id)) = self.free_parked.pop_front() {
            if self.parked.get(&worker).is_some_and(|p| p.park_id == park_id) {
                self.take_parked(&worker, token);
                return;
            }
        }
        let Some(conv) = self.convs.get(token) else {
            return;
        };
        let Some(first) = conv.pending.front() else {
            return;
        };
        let key = (Reverse(first.job.priority), at, first.seq, token.to_string());
        self.ready_key.insert(token.to_string(), key.clone());
        self.ready_set.insert(key);
    }

    fn take_parked(&mut self, worker_id: &str, token: &str) {
        if let Some(parked) = self.parked.remove(worker_id) {
            self.lease_to(token, parked.args, parked.reply);
        }
    }

    fn fire_timers(&mut self) {
        let now = self.now();
        while let Some((at, token)) = self.timers.first().cloned() {
            if at > now {
                break;
            }
            self.timers.remove(&(at, token.clone()));
            self.timer_of.remove(&token);
            self.evaluate(&token);
        }
        if self.next_sweep.is_some_and(|t| t <= now) {
            self.next_sweep = Some(now + self.ctx.settings.loops.lease_recovery_interval_ms as i64);
            self.command(Command::Release {
                limit: 500,
                reply: None,
            });
        }
    }

    // ----- commands -------------------------------------------------------------------------

    fn command(&mut self, command: Command) {
        match command {
            Command::Claim { args, reply } => self.claim(args, reply),
            Command::Heartbeat { args, reply } => self.heartbeat(args, reply),
            Command::Complete { args, reply } => self.complete(args, reply),
            Command::Fail { args, reply } => self.fail(args, reply),
            Command::Release { limit, reply } => self.release(limit, reply),
            Command::Stats { reply } => {
                let _ = reply.send(to_value(self.stats()));
            }
            Command::ListJobs { args, reply } => self.list_jobs(args, reply),
            Command::ListConversation { args, reply } => self.list_conversation(args, reply),
            Command::HasQueued { conversation_id, reply } => {
                let token = common::token::escape(&conversation_id);
                let queued = self
                    .convs
                    .get(&token)
                    .is_some_and(|c| c.pending.len() > usize::from(c.lease().is_some()));
                let _ = reply.send(Ok(Value::Bool(queued)));
            }
            Command::ControlState { worker_id, reply } => {
                let row = self.workers.get(&worker_id).map(|w| &w.row);
                let _ = reply.send(to_value(workers::control_state(
                    row,
                    self.now(),
                    self.q().stale_after_ms,
                )));
            }
            Command::WorkerStats { reply } => {
                let _ = reply.send(to_value(self.worker_stats()));
            }
            Command::ListWorkers { reply } => {
                let mut rows: Vec<&WorkerRow> = self.workers.values().map(|w| &w.row).collect();
                rows.sort_by(|a, b| a.worker_id.cmp(&b.worker_id));
                let _ = reply.send(to_value(rows));
            }
            Command::UpsertWorker { args, reply } => self.upsert_worker(*args, reply),
            Command::RequeueDeadLetter { message_id, reply } => self.requeue_dead_letter(message_id, reply),
            Command::PurgeDeadLetter { message_id, reply } => self.purge_dead_letter(message_id, reply),
            Command::WorkerOf { worker_id, reply } => {
                let _ = reply.send(self.workers.get(&worker_id).map(|w| w.row.clone()));
            }
            Command::Barrier { seq, reply } => {
                if self.last_seq >= seq {
                    let _ = reply.send(());
                } else {
                    self.barriers.push((seq, reply));
                }
            }
        }
    }

    fn claim(&mut self, args: ClaimArgs, reply: Reply) {
        let now = self.now();
        let worker = self.workers.get(&args.worker_id).map(|w| w.row.clone());
        if worker.as_ref().is_some_and(|w| w.status != WorkerStatus::Active) {
            let _ = reply.send(Ok(Value::Null));
            return;
        }
        let assignment = worker.as_ref().and_then(|w| w.assignment.clone());
        if let (Some(a), Some(filter)) = (&assignment, &args.conversation_id)
            && &a.conversation_id != filter
        {
            let _ = reply.send(Ok(Value::Null));
            return;
        }
        let target = assignment
            .as_ref()
            .map(|a| a.conversation_id.clone())
            .or_else(|| args.conversation_id.clone());
        let chosen = match &target {
            Some(conversation_id) => {
                let token = common::token::escape(conversation_id);
                // A job already leased to this worker is handed out again: its earlier claim
                // reply was lost (e.g. the previous leader died before answering).
                let own_lease = self.convs.get(&token).and_then(|c| {
                    let lease = c.lease()?;
                    (lease.worker_id == args.worker_id && !c.writing)
                        .then(|| (lease.clone(), c.pending.front().cloned()))
                });
                if let Some((lease, Some(job))) = own_lease {
                    let conv = &self.convs[&token];
                    let claim = Claim {
                        message_id: job.job.message_id.clone(),
                        conversation_id: conv.conversation_id.clone(),
                        agent_key: conv.agent_key.clone(),
                        lease_id: lease.lease_id,
                        lease_expires_at: lease.expires_at,
                        payload: job.job.payload.clone(),
                        attempts: conv.head().map(|h| h.attempts).unwrap_or(0),
                    };
                    let _ = reply.send(to_value(claim));
                    return;
                }
                let claimable = self.convs.get(&token).is_some_and(|c| {
                    c.eligible_at().is_some_and(|t| t <= now)
                        && assignment.as_ref().is_none_or(|a| a.agent_key == c.agent_key)
                }) && self
                    .fresh_owner(&token, conversation_id)
                    .is_none_or(|o| o.worker_id == args.worker_id);
                claimable.then_some(token)
            }
            None => self.ready_set.first().map(|(_, _, _, token)| token.clone()),
        };
        match chosen {
            Some(token) => {
                self.unindex(&token);
                self.lease_to(&token, args, reply);
            }
            None => self.park(args, reply),
        }
    }

    fn park(&mut self, args: ClaimArgs, reply: Reply) {
        let wait = args.wait_ms.unwrap_or(0).min(self.q().claim_wait_max_ms);
        if wait == 0 {
            let _ = reply.send(Ok(Value::Null));
            return;
        }
        self.next_park_id += 1;
        let park_id = self.next_park_id;
        let worker_id = args.worker_id.clone();
        let free =
            args.conversation_id.is_none() && self.workers.get(&worker_id).is_none_or(|w| w.row.assignment.is_none());
        if let Some(old) = self.parked.insert(worker_id.clone(), Parked { park_id, args, reply }) {
            let _ = old.reply.send(Ok(Value::Null));
        }
        if free {
            self.free_parked.push_back((worker_id.clone(), park_id));
        }
        // Long-poll timeouts are a transport matter, so they run on real time.
        self.send_later(async move {
            tokio::time::sleep(Duration::from_millis(wait)).await;
            Event::ParkExpired { worker_id, park_id }
        });
    }

    /// Writes a lease for the conversation's head to `args.worker_id`, then answers the claim.
    fn lease_to(&mut self, token: &str, args: ClaimArgs, reply: Reply) {
        let now = self.now();
        let lease_ms = self.q().lease_ms;
        let Some(conv) = self.convs.get_mut(token) else {
            let _ = reply.send(Ok(Value::Null));
            return;
        };
        let Some(first) = conv.pending.front().cloned() else {
            let _ = reply.send(Ok(Value::Null));
            return;
        };
        let mut head = conv.head().cloned().unwrap_or(HeadState {
            seq: first.seq,
            message_id: first.job.message_id.clone(),
            attempts: 0,
            not_before: None,
            last_error: None,
            lease: None,
        });
        head.lease = Some(Lease {
            lease_id: format!("{now}-{}", common::crypto::random_base36(8)),
            worker_id: args.worker_id.clone(),
            expires_at: now + lease_ms,
            claimed_at: now,
        });
        let mut state = conv.state.clone();
        state.head = Some(head);
        let worker_id = args.worker_id.clone();
        self.write_conv(token, state, After::Claim { worker_id, reply, args });
    }

    /// Looks up the job of a lease operation; answers `None` (and the caller replies with its
    /// mismatch value) when the lease is not the current one.
    fn leased_conv(&mut self, worker_id: &str, message_id: &str, lease_id: &str) -> LeaseCheck {
        let Some((token, seq)) = self.by_message.get(message_id).cloned() else {
            return LeaseCheck::Mismatch;
        };
        let Some(conv) = self.convs.get(&token) else {
            return LeaseCheck::Mismatch;
        };
        if conv.writing {
            return LeaseCheck::Busy(token);
        }
        match conv.head() {
            Some(h)
                if h.seq == seq
                    && h.lease
                        .as_ref()
                        .is_some_and(|l| l.lease_id == lease_id && l.worker_id == worker_id) =>
            {
                LeaseCheck::Held(token)
            }
            _ => LeaseCheck::Mismatch,
        }
    }

    fn heartbeat(&mut self, args: LeaseArgs, reply: Reply) {
        match self.leased_conv(&args.worker_id, &args.message_id, &args.lease_id) {
            LeaseCheck::Mismatch => {
                let _ = reply.send(Ok(Value::Bool(false)));
            }
            LeaseCheck::Busy(token) => self.defer(&token, Command::Heartbeat { args, reply }),
            LeaseCheck::Held(token) => {
                let expires = self.now() + self.q().lease_ms;
                let Some(conv) = self.convs.get(&token) else {
                    return;
                };
                let mut state = conv.state.clone();
                if let Some(lease) = state.head.as_mut().and_then(|h| h.lease.as_mut()) {
                    lease.expires_at = expires;
                }
                self.write_conv(
                    &token,
                    state,
                    After::Heartbeat {
                        worker_id: args.worker_id,
                        reply,
                    },
                );
            }
        }
    }

    fn complete(&mut self, args: LeaseArgs, reply: Reply) {
        match self.leased_conv(&args.worker_id, &args.message_id, &args.lease_id) {
            LeaseCheck::Mismatch => {
                let repeated = self.convs.values().any(|c| {
                    c.state.last_completed.as_ref().is_some_and(|l| {
                        l.message_id == args.message_id && l.lease_id == args.lease_id && l.worker_id == args.worker_id
                    })
                });
                let _ = reply.send(Ok(Value::Bool(repeated)));
            }
            LeaseCheck::Busy(token) => self.defer(&token, Command::Complete { args, reply }),
            LeaseCheck::Held(token) => {
                let Some(conv) = self.convs.get(&token) else {
                    return;
                };
                let mut state = conv.state.clone();
                state.done_seq = conv.pending.front().map(|p| p.seq).unwrap_or(state.done_seq);
                state.head = None;
                state.last_completed = Some(CompletedLease {
                    message_id: args.message_id.clone(),
                    lease_id: args.lease_id.clone(),
                    worker_id: args.worker_id.clone(),
                });
                self.write_conv(
                    &token,
                    state,
                    After::Complete {
                        worker_id: args.worker_id,
                        reply,
                    },
                );
            }
        }
    }

    fn fail(&mut self, args: FailArgs, reply: Reply) {
        match self.leased_conv(&args.worker_id, &args.message_id, &args.lease_id) {
            LeaseCheck::Mismatch => {
                let _ = reply.send(to_value(FailOutcome::default()));
            }
            LeaseCheck::Busy(token) => self.defer(&token, Command::Fail { args, reply }),
            LeaseCheck::Held(token) => {
                let now = self.now();
                let error = truncate(&args.error_message);
                let (state, outcome) = self.after_failure(&token, error, now, true);
                self.write_conv(
                    &token,
                    state,
                    After::Fail {
                        worker_id: args.worker_id,
                        reply,
                        outcome,
                    },
                );
            }
        }
    }

    /// The next state of a conversation whose head failed (or whose lease expired): retried
    /// with backoff, or dead-lettered once it has used its attempts.
    fn after_failure(&mut self, token: &str, error: String, now: Millis, backoff: bool) -> (QueueState, FailOutcome) {
        let retry = self.q().retry.clone();
        let Some(conv) = self.convs.get(token) else {
            return (QueueState::default(), FailOutcome::default());
        };
        let mut state = conv.state.clone();
        let Some(first) = conv.pending.front() else {
            return (state, FailOutcome::default());
        };
        let mut head = conv.head().cloned().unwrap_or(HeadState {
            seq: first.seq,
            message_id: first.job.message_id.clone(),
            attempts: 0,
            not_before: None,
            last_error: None,
            lease: None,
        });
        head.attempts += 1;
        head.lease = None;
        head.last_error = Some(error);
        if head.attempts >= first.job.max_attempts {
            state.done_seq = first.seq;
            state.head = None;
            (
                state,
                FailOutcome {
                    requeued: false,
                    dead_lettered: true,
                    next_scheduled_for: None,
                },
            )
        } else {
            let next = if backoff {
                now + crate::retry::retry_delay_ms(&retry, head.attempts, now)
            } else {
                now
            };
            head.not_before = Some(next);
            state.head = Some(head);
            (
                state,
                FailOutcome {
                    requeued: true,
                    dead_lettered: false,
                    next_scheduled_for: Some(next),
                },
            )
        }
    }

    fn release(&mut self, limit: usize, reply: Option<Reply>) {
        let now = self.now();
        let expired: Vec<String> = self
            .leased
            .iter()
            .take_while(|(t, _)| *t <= now)
            .map(|(_, token)| token.clone())
            .take(limit.clamp(1, 10_000))
            .collect();
        self.next_batch += 1;
        let batch_id = self.next_batch;
        let mut started = 0;
        for token in expired {
            let Some(conv) = self.convs.get(&token) else {
                continue;
            };
            let Some(lease) = conv.lease().cloned() else {
                continue;
            };
            if conv.writing || lease.expires_at > now {
                continue;
            }
            let (state, outcome) = self.after_failure(&token, LEASE_EXPIRED_ERROR.to_string(), now, false);
            started += 1;
            let after = After::Recover {
                worker_id: lease.worker_id,
                dead: outcome.dead_lettered,
                batch: Some(batch_id),
            };
            self.write_conv(&token, state, after);
        }
        if started == 0 {
            if let Some(reply) = reply {
                let _ = reply.send(to_value(ReleaseOutcome::default()));
            }
        } else {
            self.batches.insert(
                batch_id,
                ReleaseBatch {
                    outcome: ReleaseOutcome::default(),
                    remaining: started,
                    reply,
                },
            );
        }
    }

    fn defer(&mut self, token: &str, command: Command) {
        if let Some(conv) = self.convs.get_mut(token) {
            conv.deferred.push_back(command);
        }
    }

    // ----- writes ---------------------------------------------------------------------------

    fn write_conv(&mut self, token: &str, state: QueueState, after: After) {
        let Some(conv) = self.convs.get_mut(token) else {
            return;
        };
        conv.writing = true;
        let revision = conv.revision;
        let store = self.ctx.buckets.queue_state.clone();
        let dead_letter = match &after {
            After::Fail { outcome, .. } if outcome.dead_lettered => true,
            After::Recover { dead, .. } => *dead,
            _ => false,
        };
        let record = dead_letter.then(|| {
            let first = conv.pending.front();
            let head = conv.head();
            first.map(|p| DeadLetter {
                job: (*p.job).clone(),
                seq: p.seq,
                attempts: head.map(|h| h.attempts + 1).unwrap_or(1),
                last_error: state_error(&after, head),
                dead_lettered_at: self.ctx.clock.now_ms(),
            })
        });
        let dead_store = self.ctx.buckets.dead_letters.clone();
        let token = token.to_string();
        let Some(tx) = self.tx.clone() else { return };
        tokio::spawn(async move {
            // The dead-letter record is written first; if we die between the two writes the
            // job is retried and dead-lettered again onto the same key, so nothing is lost.
            if let Some(Some(record)) = record {
                match dead_store.create(&record.job.message_id, &record).await {
                    Ok(_) => {}
                    Err(e) if e.is_conflict() => {}
                    Err(e) => {
                        let _ = tx
                            .send(Event::ConvWritten {
                                token,
                                result: Err(e),
                                state,
                                after,
                            })
                            .await;
                        return;
                    }
                }
            }
            let result = store.write(&token, &state, revision).await;
            let _ = tx
                .send(Event::ConvWritten {
                    token,
                    result,
                    state,
                    after,
                })
                .await;
        });
    }

    fn on_conv_written(&mut self, token: String, result: Result<u64, StoreError>, state: QueueState, after: After) {
        let revision = match result {
            Ok(revision) => revision,
            Err(e) => return self.on_conv_write_failed(token, e, after),
        };
        let now = self.now();
        let Some(conv) = self.convs.get_mut(&token) else {
            return;
        };
        conv.writing = false;
        conv.revision = Some(revision);
        if let Some(old) = conv.lease() {
            self.leased.remove(&(old.expires_at, token.clone()));
        }
        conv.state = state;
        // Finished messages leave the index.
        let mut finished = Vec::new();
        while conv.pending.front().is_some_and(|p| p.seq <= conv.state.done_seq) {
            if let Some(p) = conv.pending.pop_front() {
                finished.push(p);
            }
        }
        let new_lease = conv.lease().cloned();
        let (conversation_id, agent_key) = (conv.conversation_id.clone(), conv.agent_key.clone());
        let deferred: Vec<Command> = conv.deferred.drain(..).collect();
        let head_job = conv.pending.front().cloned();
        for p in &finished {
            self.by_message.remove(&p.job.message_id);
        }
        if let Some(lease) = &new_lease {
            self.leased.insert((lease.expires_at, token.clone()));
        }
        match after {
            After::Claim { worker_id, reply, .. } => {
                let (Some(lease), Some(job)) = (new_lease, head_job) else {
                    return;
                };
                self.owner_of.insert(token.clone(), worker_id.clone());
                self.worker_claimed(&worker_id, &conversation_id, &agent_key, &lease.lease_id, now);
                metrics::counter!(common::telemetry::CLAIMS).increment(1);
                let attempts = self
                    .convs
                    .get(&token)
                    .and_then(|c| c.head())
                    .map(|h| h.attempts)
                    .unwrap_or(0);
                let claim = Claim {
                    message_id: job.job.message_id.clone(),
                    conversation_id,
                    agent_key,
                    lease_id: lease.lease_id,
                    lease_expires_at: lease.expires_at,
                    payload: job.job.payload.clone(),
                    attempts,
                };
                if let Err(Ok(_)) = reply.send(to_value(claim)) {
                    // The worker gave up waiting; its lease will expire and count as an attempt.
                    tracing::debug!(worker = %worker_id, "claim reply dropped");
                }
            }
            After::Heartbeat { worker_id, reply } => {
                if let Some(w) = self.workers.get_mut(&worker_id)
                    && w.row.status.is_running()
                {
                    w.row.heartbeat_at = now;
                    w.dirty = true;
                }
                let _ = reply.send(Ok(Value::Bool(true)));
            }
            After::Complete { worker_id, reply } => {
                self.worker_released(&worker_id, &conversation_id, now, true, false);
                let _ = reply.send(Ok(Value::Bool(true)));
            }
            After::Fail {
                worker_id,
                reply,
                outcome,
            } => {
                self.worker_released(&worker_id, &conversation_id, now, true, false);
                if outcome.dead_lettered {
                    self.count_dead_letter(&finished);
                }
                let _ = reply.send(to_value(outcome));
            }
            After::Recover { worker_id, dead, batch } => {
                metrics::counter!(common::telemetry::LEASE_EXPIRIES).increment(1);
                self.worker_released(&worker_id, &conversation_id, now, false, true);
                if dead {
                    self.count_dead_letter(&finished);
                }
                if let Some(id) = batch {
                    self.batch_done(id, dead);
                }
            }
        }
        self.evaluate(&token);
        for command in deferred {
            self.command(command);
        }
    }

    fn on_conv_write_failed(&mut self, token: String, error: StoreError, after: After) {
        if let Some(conv) = self.convs.get_mut(&token) {
            if error.is_conflict() {
                // Someone else (a previous leader) wrote this conversation: reload it, then
                // retry what we were doing against the fresh state.
                tracing::warn!(conversation = %conv.conversation_id, "queue state changed under us; reloading");
                match after {
                    After::Claim { args, reply, .. } => conv.deferred.push_front(Command::Claim { args, reply }),
                    After::Heartbeat { reply, .. } | After::Complete { reply, .. } => {
                        let _ = reply.send(Err(OpError::conflict("the lease changed concurrently; retry")));
                    }
                    After::Fail { reply, .. } => {
                        let _ = reply.send(Err(OpError::conflict("the lease changed concurrently; retry")));
                    }
                    After::Recover { batch, .. } => {
                        if let Some(id) = batch {
                            self.batch_skipped(id);
                        }
                    }
                }
                let store = self.ctx.buckets.queue_state.clone();
                let t = token.clone();
                self.send_later(async move {
                    let result = store.get::<QueueState>(&t).await;
                    Event::ConvReloaded { token: t, result }
                });
                return;
            }
            conv.writing = false;
        }
        tracing::error!(error = %error, "queue state write failed");
        let unavailable = || Err(OpError::unavailable("the queue store is unavailable; retry"));
        match after {
            After::Claim { reply, .. }
            | After::Heartbeat { reply, .. }
            | After::Complete { reply, .. }
            | After::Fail { reply, .. } => {
                let _ = reply.send(unavailable());
            }
            After::Recover { batch, .. } => {
                if let Some(id) = batch {
                    self.batch_skipped(id);
                }
            }
        }
        let deferred: Vec<Command> = self
            .convs
            .get_mut(&token)
            .map(|c| c.deferred.drain(..).collect())
            .unwrap_or_default();
        self.evaluate(&token);
        for command in deferred {
            self.command(command);
        }
    }

    fn on_conv_reloaded(&mut self, token: String, result: Result<Option<Versioned<QueueState>>, StoreError>) {
        let Some(conv) = self.convs.get_mut(&token) else {
            return;
        };
        match result {
            Ok(Some(v)) => {
                if let Some(old) = conv.lease() {
                    self.leased.remove(&(old.expires_at, token.clone()));
                }
                conv.revision = Some(v.revision);
                conv.state = v.value;
                while conv.pending.front().is_some_and(|p| p.seq <= conv.state.done_seq) {
                    if let Some(p) = conv.pending.pop_front() {
                        self.by_message.remove(&p.job.message_id);
                    }
                }
            }
            Ok(None) => conv.revision = None,
            Err(e) => {
                tracing::error!(error = %e, "reloading queue state failed; retrying");
                let store = self.ctx.buckets.queue_state.clone();
                self.send_later(async move {
                    tokio::time::sleep(Duration::from_millis(100)).await;
                    let result = store.get::<QueueState>(&token).await;
                    Event::ConvReloaded { token, result }
                });
                return;
            }
        }
        conv.writing = false;
        if let Some(lease) = conv.lease() {
            self.leased.insert((lease.expires_at, token.clone()));
        }
        let deferred: Vec<Command> = conv.deferred.drain(..).collect();
        self.evaluate(&token);
        for command in deferred {
            self.command(command);
        }
    }

    fn batch_done(&mut self, id: u64, dead: bool) {
        if let Some(b) = self.batches.get_mut(&id) {
            b.outcome.unlocked += 1;
            if dead {
                b.outcome.dead_lettered += 1;
            } else {
                b.outcome.requeued += 1;
            }
        }
        self.batch_skipped(id);
    }

    fn batch_skipped(&mut self, id: u64) {
        let finished = self.batches.get_mut(&id).is_some_and(|b| {
            b.remaining -= 1;
            b.remaining == 0
        });
        if finished
            && let Some(b) = self.batches.remove(&id)
            && let Some(reply) = b.reply
        {
            let _ = reply.send(to_value(b.outcome));
        }
    }

    fn count_dead_letter(&mut self, finished: &[Pending]) {
        for p in finished {
            self.dead_letters.insert(p.job.message_id.clone());
            metrics::counter!(common::telemetry::DEAD_LETTERS).increment(1);
        }
    }

    // ----- worker rows ----------------------------------------------------------------------

    fn worker_claimed(&mut self, worker_id: &str, conversation_id: &str, agent_key: &str, lease_id: &str, now: Millis) {
        let entry = self
            .workers
            .entry(worker_id.to_string())
            .or_insert_with(|| WorkerEntry {
                row: WorkerRow {
                    worker_id: worker_id.to_string(),
                    provider: "fly".to_string(),
                    volume_id: None,
                    machine_ref: None,
                    status: WorkerStatus::Active,
                    load: 0,
                    heartbeat_at: now,
                    last_claim_at: None,
                    scheduled_shutdown_at: None,
                    stopped_at: None,
                    last_snapshot_id: None,
                    assignment: None,
                    capabilities: Vec::new(),
                },
                revision: None,
                writing: false,
                dirty: true,
                waiters: Vec::new(),
            });
        let row = &mut entry.row;
        let same = row.assignment.as_ref().filter(|a| a.conversation_id == conversation_id);
        let urgent = same.is_none() || entry.revision.is_none();
        let assigned_at = same.map(|a| a.assigned_at).unwrap_or(now);
        row.assignment = Some(Assignment {
            conversation_id: conversation_id.to_string(),
            agent_key: agent_key.to_string(),
            lease_id: lease_id.to_string(),
            assigned_at,
        });
        row.status = WorkerStatus::Active;
        row.load += 1;
        row.heartbeat_at = now;
        row.last_claim_at = Some(now);
        row.scheduled_shutdown_at = None;
        row.stopped_at = None;
        entry.dirty = true;
        if urgent {
            self.flush_worker(worker_id);
        }
    }

    /// A job of `worker_id` ended: by complete/fail (`refresh` the heartbeat) or by lease
    /// recovery (`recovered`: the heartbeat is NOT refreshed, and the assignment is released).
    fn worker_released(&mut self, worker_id: &str, conversation_id: &str, now: Millis, refresh: bool, recovered: bool) {
        let idle = self.q().idle_timeout_ms;
        let Some(entry) = self.workers.get_mut(worker_id) else {
            return;
        };
        if recovered && entry.row.status == WorkerStatus::Stopped {
            return;
        }
        let row = &mut entry.row;
        row.load = row.load.saturating_sub(1);
        if refresh {
            row.heartbeat_at = now;
        }
        row.scheduled_shutdown_at = workers::idle_deadline(row, now, idle);
        entry.dirty = true;
        let release = recovered
            && row.load == 0
            && row
                .assignment
                .as_ref()
                .is_some_and(|a| a.conversation_id == conversation_id);
        if release {
            row.assignment = None;
            let token = common::token::escape(conversation_id);
            if self.owner_of.get(&token).is_some_and(|w| w == worker_id) {
                self.owner_of.remove(&token);
            }
            self.flush_worker(worker_id);
        }
    }

    fn upsert_worker(&mut self, args: UpsertWorkerArgs, reply: Reply) {
        let now = self.now();
        let worker_id = args.worker_id.clone();
        let existing = self.workers.get(&worker_id).map(|w| &w.row);
        let old_assignment = existing.and_then(|r| r.assignment.clone());
        let row = match workers::apply_upsert(existing, args, now) {
            Ok(row) => row,
            Err(e) => {
                let _ = reply.send(Err(e));
                return;
            }
        };
        let status = row.status;
        let new_assignment = row.assignment.clone();
        let entry = self.workers.entry(worker_id.clone()).or_insert_with(|| WorkerEntry {
            row: row.clone(),
            revision: None,
            writing: false,
            dirty: true,
            waiters: Vec::new(),
        });
        entry.row = row;
        entry.dirty = true;
        entry.waiters.push(reply);
        if let Some(a) = &new_assignment {
            self.owner_of
                .insert(common::token::escape(&a.conversation_id), worker_id.clone());
        }
        if status != WorkerStatus::Active
            && let Some(p) = self.parked.remove(&worker_id)
        {
            let _ = p.reply.send(Ok(Value::Null));
        }
        self.flush_worker(&worker_id);
        // Ownership may have changed: re-file the conversations involved.
        for a in [old_assignment, new_assignment].into_iter().flatten() {
            self.evaluate(&common::token::escape(&a.conversation_id));
        }
    }

    fn flush_worker(&mut self, worker_id: &str) {
        let Some(entry) = self.workers.get_mut(worker_id) else {
            return;
        };
        if entry.writing || !entry.dirty {
            return;
        }
        entry.writing = true;
        entry.dirty = false;
        let row = entry.row.clone();
        let revision = entry.revision;
        let store = self.ctx.buckets.workers.clone();
        let worker_id = worker_id.to_string();
        self.send_later(async move {
            let key = common::token::escape(&worker_id);
            let result = store.write(&key, &row, revision).await;
            Event::WorkerWritten { worker_id, result }
        });
    }

    fn on_worker_written(&mut self, worker_id: String, result: Result<u64, StoreError>) {
        let Some(entry) = self.workers.get_mut(&worker_id) else {
            return;
        };
        match result {
            Ok(revision) => {
                entry.revision = Some(revision);
                entry.writing = false;
                let row = entry.row.clone();
                for waiter in entry.waiters.drain(..) {
                    let _ = waiter.send(to_value(&row));
                }
                if entry.dirty && !entry.waiters.is_empty() {
                    self.flush_worker(&worker_id);
                }
            }
            Err(e) if e.is_conflict() => {
                let store = self.ctx.buckets.workers.clone();
                self.send_later(async move {
                    let key = common::token::escape(&worker_id);
                    let revision = store.get::<Value>(&key).await.ok().flatten().map(|v| v.revision);
                    Event::WorkerReloaded { worker_id, revision }
                });
            }
            Err(e) => {
                tracing::error!(worker = %worker_id, error = %e, "worker row write failed");
                entry.writing = false;
                entry.dirty = true;
                for waiter in entry.waiters.drain(..) {
                    let _ = waiter.send(Err(OpError::unavailable("the worker store is unavailable; retry")));
                }
            }
        }
    }

    /// Writes rows whose changes may wait (heartbeat times, load) and the replay watermark.
    fn flush_lazy(&mut self) {
        let dirty: Vec<String> = self
            .workers
            .iter()
            .filter(|(_, w)| w.dirty && !w.writing)
            .map(|(k, _)| k.clone())
            .collect();
        for worker_id in dirty {
            self.flush_worker(&worker_id);
        }
        if !self.serving {
            return;
        }
        let watermark = self
            .convs
            .values()
            .filter_map(|c| c.pending.front().map(|p| p.seq))
            .min()
            .unwrap_or(self.last_seq + 1);
        if watermark > self.watermark && !self.watermark_writing {
            self.watermark_writing = true;
            let store = self.ctx.buckets.queue_state.clone();
            let revision = self.watermark_revision;
            self.send_later(async move {
                let result = store.write(WATERMARK_KEY, &watermark, revision).await;
                let ok = result.is_ok();
                let revision = match result {
                    Ok(rev) => Some(rev),
                    // Another writer moved it; re-read the revision and try again next tick.
                    Err(_) => store
                        .get::<Value>(WATERMARK_KEY)
                        .await
                        .ok()
                        .flatten()
                        .map(|v| v.revision),
                };
                Event::WatermarkWritten {
                    watermark,
                    revision,
                    ok,
                }
            });
        }
    }

    // ----- reads ----------------------------------------------------------------------------

    fn stats(&self) -> QueueStats {
        let now = self.now();
        let mut stats = QueueStats {
            dead_letter: self.dead_letters.len() as u64,
            ..Default::default()
        };
        for conv in self.convs.values() {
            let leased = usize::from(conv.lease().is_some());
            stats.processing += leased as u64;
            let queued = conv.pending.len() - leased;
            stats.queued_total += queued as u64;
            for (i, p) in conv.pending.iter().enumerate().skip(leased) {
                let not_before = if i == 0 {
                    conv.head().and_then(|h| h.not_before)
                } else {
                    None
                };
                if p.job.scheduled_for.max(not_before.unwrap_or(0)) <= now {
                    stats.queued_ready += 1;
                }
            }
            if conv.eligible_at().is_some_and(|t| t <= now) {
                stats.ready_conversations += 1;
            }
        }
        metrics::gauge!(common::telemetry::QUEUE_DEPTH).set((stats.queued_total + stats.processing) as f64);
        metrics::gauge!(common::telemetry::READY_CONVERSATIONS).set(stats.ready_conversations as f64);
        stats
    }

    fn view(&self, conv: &Conv, index: usize, p: &Pending, with_payload: bool) -> JobView {
        let head = if index == 0 { conv.head() } else { None };
        let status = if head.is_some_and(|h| h.lease.is_some()) {
            JobStatus::Processing
        } else {
            JobStatus::Queued
        };
        JobView {
            id: p.job.message_id.clone(),
            creation_time: p.job.enqueued_at,
            conversation_id: p.job.conversation_id.clone(),
            agent_key: p.job.agent_key.clone(),
            status,
            priority: p.job.priority,
            scheduled_for: p.job.scheduled_for.max(head.and_then(|h| h.not_before).unwrap_or(0)),
            attempts: head.map(|h| h.attempts).unwrap_or(0),
            max_attempts: p.job.max_attempts,
            last_error: head.and_then(|h| h.last_error.clone()),
            payload: with_payload.then(|| p.job.payload.clone()),
        }
    }

    fn list_jobs(&mut self, args: ListJobsArgs, reply: Reply) {
        let limit = args.limit.unwrap_or(100).clamp(1, MAX_LIST);
        match args.status {
            JobStatus::Queued | JobStatus::Processing => {
                let mut rows: Vec<JobView> = self
                    .convs
                    .values()
                    .flat_map(|c| c.pending.iter().enumerate().map(move |(i, p)| (c, i, p)))
                    .map(|(c, i, p)| self.view(c, i, p, false))
                    .filter(|v| v.status == args.status)
                    .collect();
                rows.sort_by_key(|v| (v.scheduled_for, v.creation_time));
                rows.truncate(limit);
                let _ = reply.send(to_value(rows));
            }
            JobStatus::Failed => {
                // The original never writes `failed`; kept for compatibility.
                let _ = reply.send(Ok(Value::Array(Vec::new())));
            }
            JobStatus::DeadLetter => {
                let store = self.ctx.buckets.dead_letters.clone();
                tokio::spawn(async move {
                    let result = async {
                        let mut rows: Vec<JobView> = store
                            .all::<DeadLetter>()
                            .await?
                            .into_iter()
                            .map(|(_, v)| dead_letter_view(&v.value))
                            .collect();
                        rows.sort_by_key(|v| (v.scheduled_for, v.creation_time));
                        rows.truncate(limit);
                        to_value(rows)
                    }
                    .await;
                    let _ = reply.send(result.map_err(|e: OpError| e));
                });
            }
            JobStatus::Done => {
                let ctx = self.ctx.clone();
                let done: HashMap<String, u64> =
                    self.convs.iter().map(|(k, c)| (k.clone(), c.state.done_seq)).collect();
                let dead = self.dead_letters.clone();
                tokio::spawn(async move {
                    let _ = reply.send(recent_done(ctx, done, dead, limit).await);
                });
            }
        }
    }

    fn list_conversation(&mut self, args: ConversationArgs, reply: Reply) {
        let limit = args.limit.unwrap_or(100).clamp(1, 500);
        let token = common::token::escape(&args.conversation_id);
        let Some(conv) = self.convs.get(&token) else {
            let _ = reply.send(Ok(Value::Array(Vec::new())));
            return;
        };
        let mut rows: Vec<JobView> = conv
            .pending
            .iter()
            .enumerate()
            .rev()
            .map(|(i, p)| self.view(conv, i, p, true))
            .take(limit)
            .collect();
        let remaining = limit - rows.len();
        let done_seq = conv.state.done_seq;
        let dead = self.dead_letters.clone();
        let ctx = self.ctx.clone();
        tokio::spawn(async move {
            if remaining > 0 && done_seq > 0 {
                match finished_of_conversation(&ctx, &token, done_seq, &dead, remaining).await {
                    Ok(mut older) => rows.append(&mut older),
                    Err(e) => {
                        let _ = reply.send(Err(e));
                        return;
                    }
                }
            }
            let _ = reply.send(to_value(rows));
        });
    }

    fn worker_stats(&self) -> WorkerStatsView {
        let mut rows: Vec<WorkerStatsRow> = self
            .workers
            .values()
            .filter(|w| w.row.status == WorkerStatus::Active)
            .map(|w| WorkerStatsRow {
                worker_id: w.row.worker_id.clone(),
                status: w.row.status,
                load: w.row.load,
                heartbeat_at: w.row.heartbeat_at,
                machine_id: w.row.machine_ref.as_ref().map(|m| m.machine_id.clone()),
                app_name: w.row.machine_ref.as_ref().map(|m| m.app_name.clone()),
            })
            .collect();
        rows.sort_by(|a, b| a.worker_id.cmp(&b.worker_id));
        WorkerStatsView {
            active_count: rows.iter().filter(|r| r.load > 0).count() as u64,
            idle_count: rows.iter().filter(|r| r.load == 0).count() as u64,
            workers: rows,
        }
    }

    // ----- dead letters ---------------------------------------------------------------------

    fn requeue_dead_letter(&mut self, message_id: String, reply: Reply) {
        let ctx = self.ctx.clone();
        let Some(tx) = self.tx.clone() else { return };
        tokio::spawn(async move {
            let result = async {
                let store = &ctx.buckets.dead_letters;
                let Some(record) = store.get::<DeadLetter>(&message_id).await? else {
                    return Err(OpError::not_found(format!("no dead-lettered job '{message_id}'")));
                };
                let mut job = record.value.job.clone();
                job.scheduled_for = ctx.clock.now_ms();
                let body = serde_json::to_vec(&job).map_err(OpError::internal)?;
                let mut headers = async_nats::HeaderMap::new();
                // Dedup on the record's revision: a retried requeue does not enqueue twice.
                headers.insert(
                    "Nats-Msg-Id",
                    format!("requeue:{message_id}:{}", record.revision).as_str(),
                );
                let subject = common::topology::inbox_subject(&common::token::escape(&job.conversation_id));
                ctx.js
                    .publish_with_headers(subject, headers, body.into())
                    .await
                    .map_err(OpError::internal)?
                    .await
                    .map_err(OpError::internal)?;
                store.delete(&message_id, record.revision).await?;
                let _ = tx
                    .send(Event::DeadLetterRemoved {
                        message_id: message_id.clone(),
                    })
                    .await;
                Ok(Value::String(job.message_id))
            }
            .await;
            let _ = reply.send(result);
        });
    }

    fn purge_dead_letter(&mut self, message_id: String, reply: Reply) {
        let ctx = self.ctx.clone();
        let Some(tx) = self.tx.clone() else { return };
        tokio::spawn(async move {
            let result = async {
                let store = &ctx.buckets.dead_letters;
                let Some(record) = store.get::<Value>(&message_id).await? else {
                    return Ok(Value::Bool(false));
                };
                store.delete(&message_id, record.revision).await?;
                let _ = tx.send(Event::DeadLetterRemoved { message_id }).await;
                Ok(Value::Bool(true))
            }
            .await;
            let _ = reply.send(result);
        });
    }
}

enum LeaseCheck {
    Held(String),
    Busy(String),
    Mismatch,
}

fn state_error(after: &After, head: Option<&HeadState>) -> Option<String> {
    match after {
        After::Recover { .. } => Some(LEASE_EXPIRED_ERROR.to_string()),
        _ => head.and_then(|h| h.last_error.clone()),
    }
}

fn truncate(s: &str) -> String {
    if s.len() <= MAX_ERROR_BYTES {
        return s.to_string();
    }
    let mut end = MAX_ERROR_BYTES;
    while !s.is_char_boundary(end) {
        end -= 1;
    }
    s[..end].to_string()
}

fn to_value(v: impl serde::Serialize) -> Result<Value, OpError> {
    serde_json::to_value(v).map_err(OpError::internal)
}

fn dead_letter_view(d: &DeadLetter) -> JobView {
    JobView {
        id: d.job.message_id.clone(),
        creation_time: d.job.enqueued_at,
        conversation_id: d.job.conversation_id.clone(),
        agent_key: d.job.agent_key.clone(),
        status: JobStatus::DeadLetter,
        priority: d.job.priority,
        scheduled_for: d.job.scheduled_for,
        attempts: d.attempts,
        max_attempts: d.job.max_attempts,
        last_error: d.last_error.clone(),
        payload: None,
    }
}

fn done_view(job: &Job, dead: bool) -> JobView {
    JobView {
        id: job.message_id.clone(),
        creation_time: job.enqueued_at,
        conversation_id: job.conversation_id.clone(),
        agent_key: job.agent_key.clone(),
        status: if dead { JobStatus::DeadLetter } else { JobStatus::Done },
        priority: job.priority,
        scheduled_for: job.scheduled_for,
        attempts: 0,
        max_attempts: job.max_attempts,
        last_error: None,
        payload: None,
    }
}

/// The newest finished jobs across all conversations, read backwards from the inbox tail.
async fn recent_done(
    ctx: ServiceContext,
    done: HashMap<String, u64>,
    dead: HashSet<String>,
    limit: usize,
) -> Result<Value, OpError> {
    let stream = crate::enqueue::inbox(&ctx.js).await?;
    let info = stream.get_info().await.map_err(OpError::internal)?;
    let mut rows = Vec::new();
    let mut seq = info.state.last_sequence;
    let floor = info.state.first_sequence;
    let mut scanned = 0;
    while seq >= floor && seq > 0 && rows.len() < limit && scanned < limit * 20 {
        scanned += 1;
        if let Ok(msg) = stream.direct_get(seq).await {
            let token = msg.subject.as_str().rsplit('.').next().unwrap_or_default().to_string();
            if done.get(&token).is_some_and(|d| seq <= *d)
                && let Ok(job) = serde_json::from_slice::<Job>(&msg.payload)
                && !dead.contains(&job.message_id)
            {
                rows.push(done_view(&job, false));
            }
        }
        seq -= 1;
    }
    to_value(rows)
}

/// Finished jobs of one conversation, newest first, up to `limit`.
async fn finished_of_conversation(
    ctx: &ServiceContext,
    token: &str,
    done_seq: u64,
    dead: &HashSet<String>,
    limit: usize,
) -> Result<Vec<JobView>, OpError> {
    let stream = crate::enqueue::inbox(&ctx.js).await?;
    let subject = common::topology::inbox_subject(token);
    let mut ring: VecDeque<JobView> = VecDeque::with_capacity(limit + 1);
    let mut seq = 1;
    loop {
        let msg = match stream.direct_get_next_for_subject(&subject, Some(seq)).await {
            Ok(msg) => msg,
            Err(e) if e.kind() == async_nats::jetstream::stream::DirectGetErrorKind::NotFound => {
                break;
            }
            Err(e) => return Err(OpError::internal(e)),
        };
        let msg_seq = msg.sequence;
        if msg_seq > done_seq {
            break;
        }
        if let Ok(job) = serde_json::from_slice::<Job>(&msg.payload) {
            let is_dead = dead.contains(&job.message_id);
            ring.push_back(done_view(&job, is_dead));
            if ring.len() > limit {
                ring.pop_front();
            }
        }
        seq = msg_seq + 1;
    }
    Ok(ring.into_iter().rev().collect())
}
