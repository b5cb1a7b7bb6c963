//! Read operations and dead-letter maintenance.

use super::*;

impl State {
    // ----- reads ----------------------------------------------------------------------------

    pub(super) fn stats(&self) -> QueueStats {
        let now = self.now();
        let mut stats = QueueStats {
            parked_claims: self.parked.len() as u64,
            dead_letter: self.dead_letters.len() as u64,
            ..Default::default()
        };
        for conv in self.convs.values() {
            let leased = usize::from(conv.lease().is_some());
            stats.processing += leased as u64;
            let queued = conv.pending.len() - leased;
            stats.queued_total += queued as u64;
            for (i, p) in conv.pending.iter().enumerate().skip(leased) {
                let not_before = if i == 0 { conv.head().and_then(|h| h.not_before) } else { None };
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

    /// Sets the queue and worker gauges from the index (every `GAUGE_INTERVAL`, by the leader).
    pub(super) fn publish_gauges(&self) {
        use common::telemetry as t;
        let now = self.now();
        let stats = self.stats();
        metrics::gauge!(t::QUEUE_PROCESSING).set(stats.processing as f64);
        metrics::gauge!(t::QUEUE_DEAD_LETTER).set(stats.dead_letter as f64);
        // The oldest message that could be handed out now and is not: a conversation stuck
        // without a worker shows here.
        let oldest = self.convs.values().filter_map(Conv::eligible_at).filter(|t| *t <= now).min();
        let age = oldest.map(|t| now.saturating_sub(t).max(0) as f64 / 1000.0).unwrap_or(0.0);
        metrics::gauge!(t::QUEUE_OLDEST_AGE).set(age);
        let mut by_state = [0u64; 5];
        for w in self.workers.values() {
            let i = match w.row.status {
                WorkerStatus::Active if w.row.load > 0 => 0,
                WorkerStatus::Active => 1,
                WorkerStatus::Draining => 2,
                WorkerStatus::Stopping => 3,
                WorkerStatus::Stopped => 4,
            };
            by_state[i] += 1;
        }
        for (state, count) in t::WORKER_STATES.iter().zip(by_state) {
            metrics::gauge!(t::WORKERS, "state" => *state).set(count as f64);
        }
    }

    pub(super) fn view(&self, conv: &Conv, index: usize, p: &Pending, with_payload: bool) -> JobView {
        let head = if index == 0 { conv.head() } else { None };
        let status = if head.is_some_and(|h| h.lease.is_some()) { JobStatus::Processing } else { JobStatus::Queued };
        JobView {
            id: MessageId::trusted(p.job.message_id.clone()),
            creation_time: p.job.enqueued_at,
            conversation_id: ConversationId::trusted(p.job.conversation_id.clone()),
            agent_key: AgentKey::trusted(p.job.agent_key.clone()),
            status,
            priority: p.job.priority,
            scheduled_for: p.job.scheduled_for.max(head.and_then(|h| h.not_before).unwrap_or(0)),
            attempts: head.map(|h| h.attempts).unwrap_or(0),
            max_attempts: p.job.max_attempts,
            last_error: head.and_then(|h| h.last_error.clone()),
            payload: with_payload.then(|| p.job.payload.clone()),
        }
    }

    pub(super) fn list_jobs(&mut self, args: ListJobsArgs, reply: Reply) {
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
                let _ = reply.send(to_answer(rows));
            }
            JobStatus::Failed => {
                // The original never writes `failed`; kept for compatibility.
                let _ = reply.send(to_answer(Value::Array(Vec::new())));
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
                        to_answer(rows)
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

    pub(super) fn list_conversation(&mut self, args: ConversationArgs, reply: Reply) {
        let limit = args.limit.unwrap_or(100).clamp(1, 500);
        let token = common::token::escape(&args.conversation_id);
        let Some(conv) = self.convs.get(&token) else {
            let _ = reply.send(to_answer(Value::Array(Vec::new())));
            return;
        };
        let mut rows: Vec<JobView> =
            conv.pending.iter().enumerate().rev().map(|(i, p)| self.view(conv, i, p, true)).take(limit).collect();
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
            let _ = reply.send(to_answer(rows));
        });
    }

    /// The scheduler's demand (spec §3.15.2 step 7): conversations with a job claimable now
    /// (`ready`) or in flight (`leased`), sorted by agent and conversation.
    pub(super) fn demand(&self) -> Vec<DemandRow> {
        let now = self.now();
        let mut rows: Vec<DemandRow> = self
            .convs
            .values()
            .filter_map(|conv| {
                let first = conv.pending.front()?;
                let head = conv.head();
                let leased = head.is_some_and(|h| h.lease.is_some());
                let due = first.job.scheduled_for.max(head.and_then(|h| h.not_before).unwrap_or(Millis::MIN));
                let ready = !leased && due <= now;
                (leased || ready).then(|| DemandRow {
                    conversation_id: conv.conversation_id.clone(),
                    agent_key: conv.agent_key.clone(),
                    ready,
                    leased,
                })
            })
            .collect();
        rows.sort_by(|a, b| (&a.agent_key, &a.conversation_id).cmp(&(&b.agent_key, &b.conversation_id)));
        rows
    }

    pub(super) fn worker_stats(&self) -> WorkerStatsView {
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

    pub(super) fn requeue_dead_letter(&mut self, message_id: String, reply: Reply) {
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
                headers.insert("Nats-Msg-Id", format!("requeue:{message_id}:{}", record.revision).as_str());
                let subject = common::topology::inbox_subject(&common::token::escape(&job.conversation_id));
                ctx.js
                    .publish_with_headers(subject, headers, body.into())
                    .await
                    .map_err(OpError::internal)?
                    .await
                    .map_err(OpError::internal)?;
                store.delete(&message_id, record.revision).await?;
                let _ = tx.send(Event::DeadLetterRemoved { message_id: message_id.clone() }).await;
                to_answer(job.message_id)
            }
            .await;
            let _ = reply.send(result);
        });
    }

    pub(super) fn purge_dead_letter(&mut self, message_id: String, reply: Reply) {
        let ctx = self.ctx.clone();
        let Some(tx) = self.tx.clone() else { return };
        tokio::spawn(async move {
            let result = async {
                let store = &ctx.buckets.dead_letters;
                let Some(record) = store.get::<Value>(&message_id).await? else {
                    return to_answer(false);
                };
                store.delete(&message_id, record.revision).await?;
                let _ = tx.send(Event::DeadLetterRemoved { message_id }).await;
                to_answer(true)
            }
            .await;
            let _ = reply.send(result);
        });
    }
}

fn dead_letter_view(d: &DeadLetter) -> JobView {
    JobView {
        id: MessageId::trusted(d.job.message_id.clone()),
        creation_time: d.job.enqueued_at,
        conversation_id: ConversationId::trusted(d.job.conversation_id.clone()),
        agent_key: AgentKey::trusted(d.job.agent_key.clone()),
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
        id: MessageId::trusted(job.message_id.clone()),
        creation_time: job.enqueued_at,
        conversation_id: ConversationId::trusted(job.conversation_id.clone()),
        agent_key: AgentKey::trusted(job.agent_key.clone()),
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
) -> Result<Answer, OpError> {
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
    to_answer(rows)
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
