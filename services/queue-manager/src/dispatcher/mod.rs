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
use std::collections::{BTreeSet, VecDeque};
use std::sync::Arc;
use std::time::Duration;

use async_nats::jetstream::consumer::push::Ordered;
use common::OpError;
use common::clock::Millis;
use common::ids::{AgentKey, ConversationId, LeaseId, MessageId};
use common::model::{Assignment, WorkerRow, WorkerStatus};
use common::service::ServiceContext;
use common::store::{StoreError, Versioned};
use futures::StreamExt;
use futures::future::BoxFuture;
use futures::stream::FuturesUnordered;
use serde_json::Value;
use serde_json::value::RawValue;
use tokio::sync::{mpsc, oneshot, watch};
use tokio_util::sync::CancellationToken;

use crate::model::*;
use crate::workers;

/// The index's maps hash with foldhash (seeded per process): SipHash was about 5 % of the
/// dispatcher's instructions, and every operation does several lookups.
type HashMap<K, V> = std::collections::HashMap<K, V, foldhash::fast::RandomState>;
type HashSet<K> = std::collections::HashSet<K, foldhash::fast::RandomState>;

mod leases;
mod reads;
mod routing;
mod worker_rows;

/// Key of the replay watermark in `af_queue_state`. `escape` never yields `=w`, so it cannot
/// collide with a conversation token.
const WATERMARK_KEY: &str = "=watermark";
const LEASE_EXPIRED_ERROR: &str = "Lease expired while processing";
const MAX_ERROR_BYTES: usize = 4096;
const MAX_LIST: usize = 1000;
/// How often the leader refreshes the queue and worker gauges (one pass over the index).
const GAUGE_INTERVAL: Duration = Duration::from_secs(5);

/// An operation's result as JSON text: answers are serialised once, by the dispatcher, and the
/// operation layer copies them out (a job's payload is never parsed on its way to a worker).
pub type Answer = Box<RawValue>;
pub type Reply = oneshot::Sender<Result<Answer, OpError>>;

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
    /// Complete, then claim the worker's next job, answered together (one round trip).
    CompleteAndClaim {
        args: LeaseArgs,
        claim: ClaimArgs,
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
    Demand {
        reply: oneshot::Sender<Vec<DemandRow>>,
    },
    ListWorkers {
        reply: Reply,
    },
    UpsertWorker {
        args: Box<UpsertWorkerArgs>,
        reply: Reply,
    },
    RecordSnapshot {
        worker_id: String,
        snapshot_id: String,
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
    /// Internal: makes a held completion of the conversation durable, then answers `answer`.
    Flush {
        token: String,
        reply: Reply,
        answer: Result<Answer, OpError>,
    },
}

enum Event {
    Command(Command),
    ConvWritten { token: String, result: Result<u64, StoreError>, state: QueueState, after: After },
    ConvReloaded { token: String, result: Result<Option<Versioned<QueueState>>, StoreError> },
    WorkerWritten { worker_id: String, result: Result<u64, StoreError> },
    WorkerReloaded { worker_id: String, revision: Option<u64> },
    DeadLetterRemoved { message_id: String },
    WatermarkWritten { watermark: u64, revision: Option<u64>, ok: bool },
}

/// What to do once a conversation write is acknowledged.
enum After {
    Claim {
        worker_id: String,
        reply: Reply,
        args: ClaimArgs,
        /// The claim is the second half of a `completeAndClaimNext` (see `Parked::completing`):
        /// the answer is `{completed: true, next}`, given once that completion is stored.
        completing: Option<String>,
    },
    /// A held completion written on its own; the answer, if any, follows once it lands.
    Flush {
        reply: Option<(Reply, Result<Answer, OpError>)>,
    },
    Heartbeat {
        worker_id: String,
        reply: Reply,
    },
    Complete {
        worker_id: String,
        reply: Reply,
    },
    /// The completion and the next job's lease, written as one state change.
    CompleteAndLease {
        worker_id: String,
        reply: Reply,
    },
    /// The completion alone (nothing claimable right away); the claim follows once it lands.
    CompleteThenClaim {
        worker_id: String,
        reply: Reply,
        claim: ClaimArgs,
    },
    Fail {
        worker_id: String,
        reply: Reply,
        outcome: FailOutcome,
        /// This failure's error: a dead-letter record carries it (the head state it would
        /// otherwise be read from is gone with the dead-lettered job).
        error: String,
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
    pub async fn ask(&self, make: impl FnOnce(Reply) -> Command) -> Result<Answer, OpError> {
        let (tx, rx) = oneshot::channel();
        self.send(make(tx)).await?;
        rx.await.map_err(|_| OpError::unavailable("the queue leader stepped down; retry"))?
    }

    /// The scheduler's demand, read after every enqueue so far has been indexed.
    pub async fn demand(&self, js: &async_nats::jetstream::Context) -> Result<Vec<DemandRow>, OpError> {
        self.barrier(js).await?;
        let (tx, rx) = oneshot::channel();
        self.send(Command::Demand { reply: tx }).await?;
        rx.await.map_err(|_| OpError::unavailable("the queue leader stepped down; retry"))
    }

    /// Read-your-writes: waits until the index has seen every message the inbox held when
    /// this was called, so a claim or read right after an enqueue sees that enqueue.
    pub async fn barrier(&self, js: &async_nats::jetstream::Context) -> Result<(), OpError> {
        let seq = crate::enqueue::inbox(js).await?.cached_info().state.last_sequence;
        let (tx, rx) = oneshot::channel();
        self.send(Command::Barrier { seq, reply: tx }).await?;
        rx.await.map_err(|_| OpError::unavailable("the queue leader stepped down; retry"))
    }

    /// Rebuilds the index from JetStream and runs the loop until `stop` is cancelled. A loop
    /// that cannot go on (its inbox tail ended) gives up `leadership` itself.
    /// `ready` flips to true once the inbox replay has caught up.
    pub async fn start(
        ctx: ServiceContext,
        leadership: CancellationToken,
        stop: CancellationToken,
        ready: watch::Sender<bool>,
    ) -> anyhow::Result<(Self, tokio::task::JoinHandle<()>)> {
        let (tx, rx) = mpsc::channel(65_536);
        let mut state = Box::new(Box::pin(State::load(ctx.clone())).await?);
        let start_seq = state.watermark.max(1);
        let stream = crate::enqueue::inbox(&ctx.js).await.map_err(|e| anyhow::anyhow!(e.message))?;
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
        let inbox = consumer.messages().await?;
        state.tx = Some(tx.clone());
        state.ready = Some(ready);
        tokio::spawn(signal_demand(ctx.nats.clone(), state.demand.clone(), stop.clone()));
        if last_seq < start_seq {
            state.mark_caught_up();
        }
        let handle = tokio::spawn(Box::pin(state.run(rx, inbox, leadership, stop)));
        Ok((Self { tx }, handle))
    }
}

#[derive(Clone)]
struct Pending {
    seq: u64,
    job: Arc<Job>,
    /// The W3C `traceparent` the message was enqueued under (its inbox message's header), so
    /// the dispatch and the worker continue the message's trace. `None` when traces are off.
    traceparent: Option<Arc<str>>,
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

    /// The head's state, or a fresh one for a first attempt; `None` without pending jobs.
    fn head_or_fresh(&self) -> Option<HeadState> {
        let first = self.pending.front()?;
        Some(self.head().cloned().unwrap_or(HeadState {
            seq: first.seq,
            message_id: first.job.message_id.clone(),
            attempts: 0,
            not_before: None,
            last_error: None,
            lease: None,
        }))
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
        Some(first.job.scheduled_for.max(head.and_then(|h| h.not_before).unwrap_or(Millis::MIN)))
    }
}

struct WorkerEntry {
    row: WorkerRow,
    revision: Option<u64>,
    writing: bool,
    dirty: bool,
    /// Callers waiting for the row's next write to start.
    waiters: Vec<Reply>,
    /// Callers whose change is in the write under way: answered when it lands.
    in_flight: Vec<Reply>,
}

struct Parked {
    park_id: u64,
    /// When the long poll ends empty (real time: a transport matter).
    deadline: tokio::time::Instant,
    args: ClaimArgs,
    reply: Reply,
    /// Set for the long poll of a `completeAndClaimNext` whose completion is held (see
    /// `State::unflushed`): the conversation it completed, always the one it owns.
    completing: Option<String>,
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
    /// Parked workers by the conversation their claim asked for (`conversationId`), so a
    /// conversation's first message finds its worker without a scan of every long poll.
    parked_for: HashMap<String, Vec<String>>,
    /// The parked long polls by deadline (kept equal to `parked` by `park` and `unpark`).
    park_deadlines: BTreeSet<(tokio::time::Instant, String, u64)>,
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
    /// Wakes the task that tells the scheduler about unserved demand (signals coalesce).
    demand: Arc<tokio::sync::Notify>,
    /// Held completions: conversation token -> the sequence of the job whose completion is
    /// applied in the index but not yet stored. It rides on the conversation's next write (the
    /// next job's lease, usually) or is written on its own by the periodic flush, and no
    /// caller is told "completed" before it is stored.
    unflushed: HashMap<String, u64>,
    /// Store I/O started since the loop last looked (see `start_io`).
    io: Vec<BoxFuture<'static, Event>>,
}

impl State {
    async fn load(ctx: ServiceContext) -> anyhow::Result<Self> {
        let b = &ctx.buckets;
        let mut workers = HashMap::default();
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
                    in_flight: Vec::new(),
                },
            );
        }
        let mut convs = HashMap::default();
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
        let mut owner_of = HashMap::default();
        let mut by_time: Vec<(&WorkerEntry, Millis)> =
            workers.values().filter_map(|w| w.row.assignment.as_ref().map(|a| (w, a.assigned_at))).collect();
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
            by_message: HashMap::default(),
            workers,
            owner_of,
            ready_set: BTreeSet::new(),
            ready_key: HashMap::default(),
            timers: BTreeSet::new(),
            timer_of: HashMap::default(),
            leased: BTreeSet::new(),
            parked: HashMap::default(),
            parked_for: HashMap::default(),
            park_deadlines: BTreeSet::new(),
            free_parked: VecDeque::new(),
            next_park_id: 0,
            dead_letters,
            batches: HashMap::default(),
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
            demand: Arc::new(tokio::sync::Notify::new()),
            unflushed: HashMap::default(),
            io: Vec::new(),
        })
    }

    fn now(&self) -> Millis {
        self.ctx.clock.now_ms()
    }

    fn q(&self) -> &common::config::QueueSettings {
        &self.ctx.settings.queue
    }

    /// Starts store I/O whose outcome comes back as `event`. The loop polls it in place rather
    /// than on a task of its own: no spawn, no channel hop, per write.
    fn start_io(&mut self, event: impl std::future::Future<Output = Event> + Send + 'static) {
        self.io.push(Box::pin(event));
    }

    /// The loop: finished store I/O, then commands, then the inbox tail (read here rather than
    /// on a task of its own: no channel hop per message; the inbox is durable, so under a
    /// flood of commands new messages wait there).
    async fn run(
        mut self: Box<Self>,
        mut rx: mpsc::Receiver<Event>,
        mut inbox: Ordered,
        leadership: CancellationToken,
        stop: CancellationToken,
    ) {
        let clock = self.ctx.clock.clone();
        let mut flush = tokio::time::interval(Duration::from_millis(self.q().lazy_flush_ms));
        flush.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        let mut gauges = tokio::time::interval(GAUGE_INTERVAL);
        gauges.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        let mut io = FuturesUnordered::new();
        // One timer for every long poll, re-armed at the earliest deadline (real time: a poll's
        // wait is a transport matter). It starts unarmed; its branch is off until then.
        let park_timer = tokio::time::sleep(Duration::ZERO);
        tokio::pin!(park_timer);
        let mut park_armed = None;
        loop {
            io.extend(self.io.drain(..));
            let next_park = self.park_deadlines.first().map(|(t, ..)| *t);
            if next_park != park_armed
                && let Some(deadline) = next_park
            {
                park_timer.as_mut().reset(deadline);
            }
            park_armed = next_park;
            let next_timer = [self.timers.first().map(|(t, _)| *t), self.next_sweep].into_iter().flatten().min();
            // Finished I/O goes first: it unblocks conversations that commands wait on.
            tokio::select! {
                biased;
                _ = stop.cancelled() => break,
                Some(event) = io.next(), if !io.is_empty() => self.handle(event),
                event = rx.recv() => match event {
                    Some(event) => self.handle(event),
                    None => break,
                },
                next = inbox.next() => match next {
                    Some(Ok(msg)) => self.on_inbox_message(&msg),
                    end => {
                        let error = end.and_then(Result::err);
                        tracing::error!(error = ?error, "inbox tail ended; giving up leadership");
                        leadership.cancel();
                        break;
                    }
                },
                _ = &mut park_timer, if park_armed.is_some() => {
                    park_armed = None;
                    self.expire_parks();
                }
                _ = clock.sleep_until(next_timer.unwrap_or(Millis::MAX)), if next_timer.is_some() => self.fire_timers(),
                _ = clock.changed() => self.fire_timers(),
                _ = flush.tick() => self.flush_lazy(),
                _ = gauges.tick(), if self.serving => self.publish_gauges(),
            }
        }
        // Parked long polls end empty so workers retry against the next leader; one whose
        // completion was never stored fails, so the worker completes again there.
        for (_, parked) in self.parked.drain() {
            let answer = match &parked.completing {
                Some(token) if self.unflushed.contains_key(token) => {
                    Err(OpError::unavailable("the queue leader stepped down before the completion was stored; retry"))
                }
                Some(_) => complete_and_claim_answer(true, None),
                None => to_answer(Value::Null),
            };
            let _ = parked.reply.send(answer);
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
            let (worker, conversation_id, agent_key, lease_id) =
                (lease.worker_id.clone(), conv.conversation_id.clone(), conv.agent_key.clone(), lease.lease_id.clone());
            self.owner_of.insert(token.to_string(), worker.clone());
            if let Some(w) = self.workers.get_mut(&worker) {
                w.row.load += 1;
                w.dirty = true;
                if w.row.assignment.as_ref().is_none_or(|a| a.conversation_id != conversation_id) {
                    w.row.assignment =
                        Some(Assignment { conversation_id, agent_key, lease_id, assigned_at: w.row.heartbeat_at });
                    w.dirty = true;
                }
            }
        }
    }

    fn handle(&mut self, event: Event) {
        match event {
            Event::Command(command) => self.command(command),
            Event::ConvWritten { token, result, state, after } => self.on_conv_written(token, result, state, after),
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
            Event::DeadLetterRemoved { message_id } => {
                self.dead_letters.remove(&message_id);
            }
            Event::WatermarkWritten { watermark, revision, ok } => {
                self.watermark_writing = false;
                self.watermark_revision = revision;
                if ok {
                    self.watermark = watermark;
                }
            }
        }
    }

    fn on_inbox_message(&mut self, msg: &async_nats::jetstream::Message) {
        let Ok(info) = msg.info() else { return };
        let seq = info.stream_sequence;
        let token = msg.subject.as_str().rsplit('.').next().unwrap_or_default().to_string();
        let traceparent = common::telemetry::traceparent_header(msg.headers.as_ref()).map(Arc::from);
        match serde_json::from_slice::<Job>(&msg.payload) {
            Ok(job) => self.on_inbox(seq, token, Arc::new(job), traceparent),
            Err(e) => tracing::error!(seq, error = %e, "undecodable inbox message skipped"),
        }
    }

    fn on_inbox(&mut self, seq: u64, token: String, job: Arc<Job>, traceparent: Option<Arc<str>>) {
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
            conv.pending.push_back(Pending { seq, job, traceparent });
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
}

/// Publishes one demand signal per wake-up: a burst of unserved jobs costs the scheduler one
/// message, not one per job, and a signal raised while one is being sent is never lost.
async fn signal_demand(nats: async_nats::Client, demand: Arc<tokio::sync::Notify>, stop: CancellationToken) {
    loop {
        tokio::select! {
            _ = stop.cancelled() => return,
            _ = demand.notified() => {}
        }
        if let Err(e) = nats.publish(common::topology::DEMAND_SUBJECT, bytes::Bytes::new()).await {
            tracing::warn!(error = %e, "could not signal demand to the scheduler");
        }
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
        After::Fail { error, .. } => Some(error.clone()),
        _ => head.and_then(|h| h.last_error.clone()),
    }
}

/// The answer of `completeAndClaimNext`; `next` is a claim's answer (`None` for no job).
fn complete_and_claim_answer(completed: bool, next: Option<&RawValue>) -> Result<Answer, OpError> {
    #[derive(serde::Serialize)]
    struct CompleteAndClaim<'a> {
        completed: bool,
        next: Option<&'a RawValue>,
    }
    to_answer(CompleteAndClaim { completed, next })
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

fn to_answer(v: impl serde::Serialize) -> Result<Answer, OpError> {
    serde_json::value::to_raw_value(&v).map_err(OpError::internal)
}
