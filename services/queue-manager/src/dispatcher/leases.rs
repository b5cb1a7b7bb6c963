//! Everything done under a lease: heartbeat, complete, fail, recovery, the CAS writes that
//! record them, and applying (or reloading after) acknowledged writes.

use super::*;

impl State {
    /// Looks up the job of a lease operation; answers `None` (and the caller replies with its
    /// mismatch value) when the lease is not the current one.
    pub(super) fn leased_conv(&mut self, worker_id: &str, message_id: &str, lease_id: &str) -> LeaseCheck {
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
                    && h.lease.as_ref().is_some_and(|l| l.lease_id == lease_id && l.worker_id == worker_id) =>
            {
                LeaseCheck::Held(token)
            }
            _ => LeaseCheck::Mismatch,
        }
    }

    pub(super) fn heartbeat(&mut self, args: LeaseArgs, reply: Reply) {
        match self.leased_conv(&args.worker_id, &args.message_id, &args.lease_id) {
            LeaseCheck::Mismatch => {
                let _ = reply.send(to_answer(false));
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
                self.write_conv(&token, state, After::Heartbeat { worker_id: args.worker_id.into_string(), reply });
            }
        }
    }

    pub(super) fn complete(&mut self, args: LeaseArgs, reply: Reply) {
        match self.leased_conv(&args.worker_id, &args.message_id, &args.lease_id) {
            LeaseCheck::Mismatch => self.answer_completed_before(&args, reply, to_answer),
            LeaseCheck::Busy(token) => self.defer(&token, Command::Complete { args, reply }),
            LeaseCheck::Held(token) => {
                let Some(state) = self.completed_state(&token, &args) else { return };
                self.write_conv(&token, state, After::Complete { worker_id: args.worker_id.into_string(), reply });
            }
        }
    }

    /// `completeAndClaimNext`: when the worker's conversation has its next job claimable now,
    /// the completion and that job's lease are one state write and one answer. Otherwise a
    /// worker that will wait holds its completion (see `State::unflushed`): the next job's
    /// lease, or the end of the wait, writes it. Without a wait the completion is written and
    /// the worker claims as usual.
    pub(super) fn complete_and_claim(&mut self, args: LeaseArgs, claim: ClaimArgs, reply: Reply) {
        match self.leased_conv(&args.worker_id, &args.message_id, &args.lease_id) {
            LeaseCheck::Mismatch => {
                self.answer_completed_before(&args, reply, |done| complete_and_claim_answer(done, None))
            }
            LeaseCheck::Busy(token) => self.defer(&token, Command::CompleteAndClaim { args, claim, reply }),
            LeaseCheck::Held(token) => {
                let Some(mut state) = self.completed_state(&token, &args) else { return };
                let now = self.now();
                let active =
                    self.workers.get(args.worker_id.as_str()).is_none_or(|w| w.row.status == WorkerStatus::Active);
                let next = self.convs.get(&token).and_then(|c| c.pending.get(1)).filter(|p| p.job.scheduled_for <= now);
                match next {
                    Some(next) if active => {
                        state.head = Some(HeadState {
                            seq: next.seq,
                            message_id: next.job.message_id.clone(),
                            attempts: 0,
                            not_before: None,
                            last_error: None,
                            lease: Some(self.new_lease(&args.worker_id, now)),
                        });
                        self.write_conv(
                            &token,
                            state,
                            After::CompleteAndLease { worker_id: args.worker_id.into_string(), reply },
                        );
                    }
                    _ if active && claim.wait_ms.unwrap_or(0) > 0 => {
                        self.hold_completion(&token, state, &args.worker_id, now);
                        self.park(claim, reply, Some(token));
                    }
                    _ => {
                        let after = After::CompleteThenClaim { worker_id: args.worker_id.into_string(), reply, claim };
                        self.write_conv(&token, state, after);
                    }
                }
            }
        }
    }

    /// Answers a completion whose lease is not current: whether this exact lease already
    /// completed its job (a retry whose first answer was lost), once that completion is stored.
    fn answer_completed_before(
        &mut self,
        args: &LeaseArgs,
        reply: Reply,
        answer: impl Fn(bool) -> Result<Answer, OpError>,
    ) {
        let done = self.convs.iter().find(|(_, c)| {
            c.state.last_completed.as_ref().is_some_and(|l| {
                l.message_id == args.message_id && l.lease_id == args.lease_id && l.worker_id == args.worker_id
            })
        });
        match done.map(|(token, _)| token.clone()) {
            Some(token) if self.unflushed.contains_key(&token) => self.flush_conv(&token, Some((reply, answer(true)))),
            done => {
                let _ = reply.send(answer(done.is_some()));
            }
        }
    }

    /// Applies a completion to the index without writing it; the conversation's next write
    /// carries it (every write stores the whole state), or `flush_conv` writes it alone.
    fn hold_completion(&mut self, token: &str, state: QueueState, worker_id: &str, now: Millis) {
        metrics::counter!(common::telemetry::COMPLETIONS).increment(1);
        self.unflushed.entry(token.to_string()).or_insert(state.done_seq);
        self.apply_state(token, state);
        let conversation_id = self.convs.get(token).map(|c| c.conversation_id.clone()).unwrap_or_default();
        self.worker_released(worker_id, &conversation_id, now, true, false);
        self.evaluate(token);
    }

    /// Stores a held completion, then answers `reply` (if any). A write already under way
    /// carries it; the answer then waits for that write.
    pub(super) fn flush_conv(&mut self, token: &str, reply: Option<(Reply, Result<Answer, OpError>)>) {
        match self.convs.get(token) {
            Some(conv) if conv.writing => {
                if let Some((reply, answer)) = reply {
                    self.defer(token, Command::Flush { token: token.to_string(), reply, answer });
                }
            }
            Some(conv) if self.unflushed.contains_key(token) => {
                let state = conv.state.clone();
                self.write_conv(token, state, After::Flush { reply });
            }
            _ => send_answer(reply),
        }
    }

    /// Makes `state` the conversation's state in the index: re-files its lease and drops
    /// finished messages, which are returned.
    fn apply_state(&mut self, token: &str, state: QueueState) -> Vec<Pending> {
        let Some(conv) = self.convs.get_mut(token) else {
            return Vec::new();
        };
        if let Some(old) = conv.lease() {
            self.leased.remove(&(old.expires_at, token.to_string()));
        }
        conv.state = state;
        let mut finished = Vec::new();
        while conv.pending.front().is_some_and(|p| p.seq <= conv.state.done_seq) {
            if let Some(p) = conv.pending.pop_front() {
                finished.push(p);
            }
        }
        if let Some(lease) = conv.lease() {
            self.leased.insert((lease.expires_at, token.to_string()));
        }
        for p in &finished {
            self.by_message.remove(&p.job.message_id);
        }
        finished
    }

    /// The conversation's state once its head job is done.
    fn completed_state(&self, token: &str, args: &LeaseArgs) -> Option<QueueState> {
        let conv = self.convs.get(token)?;
        let mut state = conv.state.clone();
        state.done_seq = conv.pending.front().map(|p| p.seq).unwrap_or(state.done_seq);
        state.head = None;
        state.last_completed = Some(CompletedLease {
            message_id: args.message_id.to_string(),
            lease_id: args.lease_id.to_string(),
            worker_id: args.worker_id.to_string(),
        });
        Some(state)
    }

    /// A fresh lease for `worker_id` starting at `now`.
    pub(super) fn new_lease(&self, worker_id: &str, now: Millis) -> Lease {
        Lease {
            lease_id: format!("{now}-{}", common::crypto::random_base36(8)),
            worker_id: worker_id.to_string(),
            expires_at: now + self.q().lease_ms,
            claimed_at: now,
        }
    }

    pub(super) fn fail(&mut self, args: FailArgs, reply: Reply) {
        match self.leased_conv(&args.worker_id, &args.message_id, &args.lease_id) {
            LeaseCheck::Mismatch => {
                let _ = reply.send(to_answer(FailOutcome::default()));
            }
            LeaseCheck::Busy(token) => self.defer(&token, Command::Fail { args, reply }),
            LeaseCheck::Held(token) => {
                let now = self.now();
                let error = truncate(&args.error_message);
                let (state, outcome) = self.after_failure(&token, error.clone(), now, true);
                let after = After::Fail { worker_id: args.worker_id.into_string(), reply, outcome, error };
                self.write_conv(&token, state, after);
            }
        }
    }

    /// The next state of a conversation whose head failed (or whose lease expired): retried
    /// with backoff, or dead-lettered once it has used its attempts.
    pub(super) fn after_failure(
        &mut self,
        token: &str,
        error: String,
        now: Millis,
        backoff: bool,
    ) -> (QueueState, FailOutcome) {
        let retry = self.q().retry.clone();
        let Some(conv) = self.convs.get(token) else {
            return (QueueState::default(), FailOutcome::default());
        };
        let mut state = conv.state.clone();
        let (Some(first), Some(mut head)) = (conv.pending.front(), conv.head_or_fresh()) else {
            return (state, FailOutcome::default());
        };
        head.attempts += 1;
        head.lease = None;
        head.last_error = Some(error);
        if head.attempts >= first.job.max_attempts {
            state.done_seq = first.seq;
            state.head = None;
            (state, FailOutcome { requeued: false, dead_lettered: true, next_scheduled_for: None })
        } else {
            let next = if backoff { now + crate::retry::retry_delay_ms(&retry, head.attempts, now) } else { now };
            head.not_before = Some(next);
            state.head = Some(head);
            (state, FailOutcome { requeued: true, dead_lettered: false, next_scheduled_for: Some(next) })
        }
    }

    pub(super) fn release(&mut self, limit: usize, reply: Option<Reply>) {
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
            let after =
                After::Recover { worker_id: lease.worker_id, dead: outcome.dead_lettered, batch: Some(batch_id) };
            self.write_conv(&token, state, after);
        }
        if started == 0 {
            if let Some(reply) = reply {
                let _ = reply.send(to_answer(ReleaseOutcome::default()));
            }
        } else {
            self.batches
                .insert(batch_id, ReleaseBatch { outcome: ReleaseOutcome::default(), remaining: started, reply });
        }
    }

    pub(super) fn defer(&mut self, token: &str, command: Command) {
        if let Some(conv) = self.convs.get_mut(token) {
            conv.deferred.push_back(command);
        }
    }

    // ----- writes ---------------------------------------------------------------------------

    pub(super) fn write_conv(&mut self, token: &str, state: QueueState, after: After) {
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
        self.start_io(async move {
            // The dead-letter record is written first; if we die between the two writes the
            // job is retried and dead-lettered again onto the same key, so nothing is lost.
            if let Some(Some(record)) = record {
                match dead_store.create(&record.job.message_id, &record).await {
                    Ok(_) => {}
                    Err(e) if e.is_conflict() => {}
                    Err(e) => return Event::ConvWritten { token, result: Err(e), state, after },
                }
            }
            let result = store.write(&token, &state, revision).await;
            Event::ConvWritten { token, result, state, after }
        });
    }

    pub(super) fn on_conv_written(
        &mut self,
        token: String,
        result: Result<u64, StoreError>,
        state: QueueState,
        after: After,
    ) {
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
        // Every write stores the whole state, held completions included.
        self.unflushed.remove(&token);
        // Finished messages leave the index.
        let finished = self.apply_state(&token, state);
        let Some(conv) = self.convs.get_mut(&token) else {
            return;
        };
        let new_lease = conv.lease().cloned();
        let conversation_id = conv.conversation_id.clone();
        let deferred: Vec<Command> = conv.deferred.drain(..).collect();
        let head_job = conv.pending.front().cloned();
        let mut follow_up = None;
        match after {
            After::Claim { worker_id, reply, completing, .. } => {
                let Some(claim) = self.claimed(&token, &worker_id, new_lease, head_job, now) else { return };
                let claim = to_answer(claim);
                match completing {
                    None => {
                        if let Err(Ok(_)) = reply.send(claim) {
                            // The worker gave up waiting; its lease will expire and count as
                            // an attempt.
                            tracing::debug!(worker = %worker_id, "claim reply dropped");
                        }
                    }
                    Some(completed) => match claim {
                        Ok(next) => {
                            let answer = complete_and_claim_answer(true, Some(&*next));
                            self.flush_conv(&completed, Some((reply, answer)));
                        }
                        Err(e) => {
                            let _ = reply.send(Err(e));
                        }
                    },
                }
            }
            After::Flush { reply } => send_answer(reply),
            After::CompleteAndLease { worker_id, reply } => {
                metrics::counter!(common::telemetry::COMPLETIONS).increment(1);
                self.worker_released(&worker_id, &conversation_id, now, true, false);
                let next = self.claimed(&token, &worker_id, new_lease, head_job, now);
                let answer = match next.map(to_answer).transpose() {
                    Ok(next) => complete_and_claim_answer(true, next.as_deref()),
                    Err(e) => Err(e),
                };
                let _ = reply.send(answer);
            }
            After::CompleteThenClaim { worker_id, reply, claim } => {
                metrics::counter!(common::telemetry::COMPLETIONS).increment(1);
                self.worker_released(&worker_id, &conversation_id, now, true, false);
                // The claim answers on its own channel; forward it inside the combined answer.
                let (tx, rx) = oneshot::channel::<Result<Answer, OpError>>();
                tokio::spawn(async move {
                    let answer = match rx.await {
                        Ok(Ok(next)) => complete_and_claim_answer(true, Some(&*next)),
                        Ok(Err(e)) => Err(e),
                        Err(_) => complete_and_claim_answer(true, None),
                    };
                    let _ = reply.send(answer);
                });
                follow_up = Some(Command::Claim { args: claim, reply: tx });
            }
            After::Heartbeat { worker_id, reply } => {
                if let Some(w) = self.workers.get_mut(&worker_id)
                    && w.row.status.is_running()
                {
                    w.row.heartbeat_at = now;
                    w.dirty = true;
                }
                let _ = reply.send(to_answer(true));
            }
            After::Complete { worker_id, reply } => {
                metrics::counter!(common::telemetry::COMPLETIONS).increment(1);
                self.worker_released(&worker_id, &conversation_id, now, true, false);
                let _ = reply.send(to_answer(true));
            }
            After::Fail { worker_id, reply, outcome, .. } => {
                let label = if outcome.dead_lettered { "dead_letter" } else { "retry" };
                metrics::counter!(common::telemetry::FAILURES, "outcome" => label).increment(1);
                self.worker_released(&worker_id, &conversation_id, now, true, false);
                if outcome.dead_lettered {
                    self.count_dead_letter(&finished);
                }
                let _ = reply.send(to_answer(outcome));
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
        for command in deferred.into_iter().chain(follow_up) {
            self.command(command);
        }
    }

    /// Records a claim whose lease write landed and builds the worker's answer.
    fn claimed(
        &mut self,
        token: &str,
        worker_id: &str,
        lease: Option<Lease>,
        job: Option<Pending>,
        now: Millis,
    ) -> Option<Claim> {
        let (lease, job) = (lease?, job?);
        let conv = self.convs.get(token)?;
        let (conversation_id, agent_key) = (conv.conversation_id.clone(), conv.agent_key.clone());
        let attempts = conv.head().map(|h| h.attempts).unwrap_or(0);
        self.owner_of.insert(token.to_string(), worker_id.to_string());
        self.worker_claimed(worker_id, &conversation_id, &agent_key, &lease.lease_id, now);
        metrics::counter!(common::telemetry::CLAIMS).increment(1);
        if attempts == 0 {
            // From due (enqueued, or its scheduled time) to leased; retries wait their backoff.
            let due = job.job.scheduled_for.max(job.job.enqueued_at);
            let latency = now.saturating_sub(due).max(0) as f64 / 1000.0;
            metrics::histogram!(common::telemetry::DISPATCH_LATENCY).record(latency);
        }
        // The dispatch continues the trace the message was enqueued under; the worker gets
        // this span's context and continues from it.
        let traceparent = job.traceparent.as_deref().and_then(|parent| {
            let span = tracing::info_span!(
                "queue.dispatch",
                otel.name = "queue.dispatch",
                af.message_id = %job.job.message_id,
                af.worker_id = %worker_id,
                af.attempts = attempts,
                af.queue_wait_ms = now.saturating_sub(job.job.enqueued_at).max(0),
            );
            common::telemetry::set_parent_from_traceparent(&span, parent);
            common::telemetry::traceparent_of(&span)
        });
        Some(Claim {
            message_id: MessageId::trusted(job.job.message_id.clone()),
            conversation_id: ConversationId::trusted(conversation_id),
            agent_key: AgentKey::trusted(agent_key),
            lease_id: LeaseId::trusted(lease.lease_id),
            lease_expires_at: lease.expires_at,
            payload: job.job.payload.clone(),
            attempts,
            traceparent,
        })
    }

    pub(super) fn on_conv_write_failed(&mut self, token: String, error: StoreError, after: After) {
        if let Some(conv) = self.convs.get_mut(&token) {
            if error.is_conflict() {
                // Someone else (a previous leader) wrote this conversation: reload it, then
                // retry what we were doing against the fresh state.
                tracing::warn!(conversation = %conv.conversation_id, "queue state changed under us; reloading");
                // A held completion is lost with our view of the state: its worker is told
                // to retry, and completes again against what is stored.
                self.unflushed.remove(&token);
                match after {
                    After::Claim { args, reply, completing: None, .. } => {
                        conv.deferred.push_front(Command::Claim { args, reply })
                    }
                    After::Claim { reply, .. } | After::Flush { reply: Some((reply, _)) } => {
                        let _ = reply.send(Err(OpError::conflict("the lease changed concurrently; retry")));
                    }
                    After::Flush { reply: None } => {}
                    After::Heartbeat { reply, .. }
                    | After::Complete { reply, .. }
                    | After::CompleteAndLease { reply, .. }
                    | After::CompleteThenClaim { reply, .. } => {
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
                self.start_io(async move {
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
            | After::Flush { reply: Some((reply, _)) }
            | After::Heartbeat { reply, .. }
            | After::Complete { reply, .. }
            | After::CompleteAndLease { reply, .. }
            | After::CompleteThenClaim { reply, .. }
            | After::Fail { reply, .. } => {
                let _ = reply.send(unavailable());
            }
            After::Flush { reply: None } => {}
            After::Recover { batch, .. } => {
                if let Some(id) = batch {
                    self.batch_skipped(id);
                }
            }
        }
        let deferred: Vec<Command> =
            self.convs.get_mut(&token).map(|c| c.deferred.drain(..).collect()).unwrap_or_default();
        self.evaluate(&token);
        for command in deferred {
            self.command(command);
        }
    }

    pub(super) fn on_conv_reloaded(
        &mut self,
        token: String,
        result: Result<Option<Versioned<QueueState>>, StoreError>,
    ) {
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
                self.start_io(async move {
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

    pub(super) fn batch_done(&mut self, id: u64, dead: bool) {
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

    pub(super) fn batch_skipped(&mut self, id: u64) {
        let finished = self.batches.get_mut(&id).is_some_and(|b| {
            b.remaining -= 1;
            b.remaining == 0
        });
        if finished
            && let Some(b) = self.batches.remove(&id)
            && let Some(reply) = b.reply
        {
            let _ = reply.send(to_answer(b.outcome));
        }
    }

    pub(super) fn count_dead_letter(&mut self, finished: &[Pending]) {
        for p in finished {
            self.dead_letters.insert(p.job.message_id.clone());
            metrics::counter!(common::telemetry::DEAD_LETTERS).increment(1);
        }
    }
}

/// Sends a prepared answer, if there is a caller waiting for one.
fn send_answer(reply: Option<(Reply, Result<Answer, OpError>)>) {
    if let Some((reply, answer)) = reply {
        let _ = reply.send(answer);
    }
}
