//! Filing conversations (ready set, timers, owners), routing commands, and handing jobs to
//! claiming or parked workers.

use super::*;

impl State {
    // ----- dispatch -------------------------------------------------------------------------

    pub(super) fn unindex(&mut self, token: &str) {
        if let Some(key) = self.ready_key.remove(token) {
            self.ready_set.remove(&key);
        }
        if let Some(t) = self.timer_of.remove(token) {
            self.timers.remove(&(t, token.to_string()));
        }
    }

    pub(super) fn set_timer(&mut self, token: &str, at: Millis) {
        self.timer_of.insert(token.to_string(), at);
        self.timers.insert((at, token.to_string()));
    }

    /// The live sticky owner of a conversation, if any.
    pub(super) fn fresh_owner(&self, token: &str, conversation_id: &str) -> Option<&WorkerRow> {
        let worker = self.owner_of.get(token)?;
        let row = &self.workers.get(worker)?.row;
        workers::is_fresh_owner(row, conversation_id, self.now(), self.q().stale_after_ms).then_some(row)
    }

    /// Re-files a conversation after anything about it changed: hands it to a waiting worker,
    /// files it as ready, or sets a timer for when that may change.
    pub(super) fn evaluate(&mut self, token: &str) {
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
        let filtered = self.parked_for.get(&conversation_id).and_then(|waiting| {
            waiting.iter().find(|w| self.workers.get(*w).is_none_or(|w| w.row.assignment.is_none())).cloned()
        });
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
        // No live worker took it: the scheduler may need to start one.
        self.demand.notify_one();
    }

    pub(super) fn take_parked(&mut self, worker_id: &str, token: &str) {
        if let Some(parked) = self.unpark(worker_id) {
            // A completing poll is only ever handed the conversation it completed (it is that
            // conversation's owner and not free), so this lease write carries the completion.
            debug_assert!(parked.completing.as_deref().is_none_or(|t| t == token));
            self.lease_to(token, parked.args, parked.reply, parked.completing);
        }
    }

    /// Ends a long poll without a job.
    pub(super) fn end_park(&mut self, parked: Parked) {
        self.answer_no_job(parked.reply, parked.completing);
    }

    /// Answers a claim that gets no job. For the claim half of a `completeAndClaimNext`
    /// (`completing`), a held completion is stored first: "completed" is never said early.
    pub(super) fn answer_no_job(&mut self, reply: Reply, completing: Option<String>) {
        let Some(token) = completing else {
            let _ = reply.send(to_answer(Value::Null));
            return;
        };
        let answer = complete_and_claim_answer(true, None);
        if self.unflushed.contains_key(&token) {
            self.flush_conv(&token, Some((reply, answer)));
        } else {
            let _ = reply.send(answer);
        }
    }

    pub(super) fn fire_timers(&mut self) {
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
            self.command(Command::Release { limit: 500, reply: None });
        }
    }

    // ----- commands -------------------------------------------------------------------------

    pub(super) fn command(&mut self, command: Command) {
        match command {
            Command::Claim { args, reply } => self.claim(args, reply),
            Command::Heartbeat { args, reply } => self.heartbeat(args, reply),
            Command::Complete { args, reply } => self.complete(args, reply),
            Command::CompleteAndClaim { args, claim, reply } => self.complete_and_claim(args, claim, reply),
            Command::Fail { args, reply } => self.fail(args, reply),
            Command::Release { limit, reply } => self.release(limit, reply),
            Command::Stats { reply } => {
                let _ = reply.send(to_answer(self.stats()));
            }
            Command::ListJobs { args, reply } => self.list_jobs(args, reply),
            Command::ListConversation { args, reply } => self.list_conversation(args, reply),
            Command::HasQueued { conversation_id, reply } => {
                let token = common::token::escape(&conversation_id);
                let queued = self.convs.get(&token).is_some_and(|c| c.pending.len() > usize::from(c.lease().is_some()));
                let _ = reply.send(to_answer(queued));
            }
            Command::ControlState { worker_id, reply } => {
                let row = self.workers.get(&worker_id).map(|w| &w.row);
                let _ = reply.send(to_answer(workers::control_state(row, self.now(), self.q().stale_after_ms)));
            }
            Command::WorkerStats { reply } => {
                let _ = reply.send(to_answer(self.worker_stats()));
            }
            Command::Demand { reply } => {
                let _ = reply.send(self.demand());
            }
            Command::ListWorkers { reply } => {
                let mut rows: Vec<WorkerView> = self.workers.values().map(|w| w.row.clone().into()).collect();
                rows.sort_by(|a, b| a.worker_id.cmp(&b.worker_id));
                let _ = reply.send(to_answer(rows));
            }
            Command::UpsertWorker { args, reply } => self.upsert_worker(*args, reply),
            Command::RecordSnapshot { worker_id, snapshot_id, reply } => {
                self.record_snapshot(worker_id, snapshot_id, reply)
            }
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
            Command::Flush { token, reply, answer } => self.flush_conv(&token, Some((reply, answer))),
        }
    }

    pub(super) fn claim(&mut self, args: ClaimArgs, reply: Reply) {
        let now = self.now();
        let worker = self.workers.get(args.worker_id.as_str()).map(|w| w.row.clone());
        if worker.as_ref().is_some_and(|w| w.status != WorkerStatus::Active) {
            let _ = reply.send(to_answer(Value::Null));
            return;
        }
        // Presence (fix L1): a worker that keeps polling is alive even while idle, so its idle
        // deadline, not the stale-heartbeat rule, decides when it drains. Written lazily.
        if let Some(entry) = self.workers.get_mut(args.worker_id.as_str()) {
            entry.row.heartbeat_at = now;
            entry.dirty = true;
        }
        let assignment = worker.as_ref().and_then(|w| w.assignment.clone());
        if let (Some(a), Some(filter)) = (&assignment, &args.conversation_id)
            && &a.conversation_id != filter
        {
            let _ = reply.send(to_answer(Value::Null));
            return;
        }
        let target = assignment
            .as_ref()
            .map(|a| a.conversation_id.clone())
            .or_else(|| args.conversation_id.as_ref().map(|c| c.to_string()));
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
                        message_id: MessageId::trusted(job.job.message_id.clone()),
                        conversation_id: ConversationId::trusted(conv.conversation_id.clone()),
                        agent_key: AgentKey::trusted(conv.agent_key.clone()),
                        lease_id: LeaseId::trusted(lease.lease_id),
                        lease_expires_at: lease.expires_at,
                        payload: job.job.payload.clone(),
                        attempts: conv.head().map(|h| h.attempts).unwrap_or(0),
                        // Handed out again: the worker continues the message's trace itself.
                        traceparent: job.traceparent.as_deref().map(str::to_string),
                    };
                    let _ = reply.send(to_answer(claim));
                    return;
                }
                let claimable =
                    self.convs.get(&token).is_some_and(|c| {
                        c.eligible_at().is_some_and(|t| t <= now)
                            && assignment.as_ref().is_none_or(|a| a.agent_key == c.agent_key)
                    }) && self.fresh_owner(&token, conversation_id).is_none_or(|o| o.worker_id == args.worker_id);
                claimable.then_some(token)
            }
            None => self.ready_set.first().map(|(_, _, _, token)| token.clone()),
        };
        match chosen {
            Some(token) => {
                self.unindex(&token);
                self.lease_to(&token, args, reply, None);
            }
            None => self.park(args, reply, None),
        }
    }

    pub(super) fn park(&mut self, args: ClaimArgs, reply: Reply, completing: Option<String>) {
        let wait = args.wait_ms.unwrap_or(0).min(self.q().claim_wait_max_ms);
        if wait == 0 {
            return self.answer_no_job(reply, completing);
        }
        self.next_park_id += 1;
        let park_id = self.next_park_id;
        let deadline = tokio::time::Instant::now() + Duration::from_millis(wait);
        let parked = Parked { park_id, deadline, args, reply, completing };
        let worker_id = parked.args.worker_id.to_string();
        let free = parked.args.conversation_id.is_none()
            && parked.completing.is_none()
            && self.workers.get(&worker_id).is_none_or(|w| w.row.assignment.is_none());
        if let Some(old) = self.unpark(&worker_id) {
            self.end_park(old);
        }
        if let Some(filter) = &parked.args.conversation_id {
            self.parked_for.entry(filter.to_string()).or_default().push(worker_id.clone());
        }
        self.parked.insert(worker_id.clone(), parked);
        if free {
            self.free_parked.push_back((worker_id.clone(), park_id));
        }
        self.park_deadlines.insert((deadline, worker_id, park_id));
    }

    /// Ends the long polls whose wait is over.
    pub(super) fn expire_parks(&mut self) {
        let now = tokio::time::Instant::now();
        while self.park_deadlines.first().is_some_and(|(t, ..)| *t <= now) {
            let Some((_, worker_id, park_id)) = self.park_deadlines.pop_first() else { break };
            if self.parked.get(&worker_id).is_some_and(|p| p.park_id == park_id)
                && let Some(p) = self.unpark(&worker_id)
            {
                self.end_park(p);
            }
        }
    }

    /// Takes a worker's long poll out of the parked set and its indexes.
    pub(super) fn unpark(&mut self, worker_id: &str) -> Option<Parked> {
        let parked = self.parked.remove(worker_id)?;
        self.park_deadlines.remove(&(parked.deadline, worker_id.to_string(), parked.park_id));
        if parked.args.conversation_id.is_none() {
            // It may be queued as a free worker; without this a free worker that re-polls
            // every wait would leave one stale entry per poll.
            self.free_parked.retain(|(w, id)| !(w == worker_id && *id == parked.park_id));
        }
        if let Some(filter) = &parked.args.conversation_id
            && let Some(waiting) = self.parked_for.get_mut(filter.as_str())
        {
            waiting.retain(|w| w != worker_id);
            if waiting.is_empty() {
                self.parked_for.remove(filter.as_str());
            }
        }
        Some(parked)
    }

    /// Writes a lease for the conversation's head to `args.worker_id`, then answers the claim.
    pub(super) fn lease_to(&mut self, token: &str, args: ClaimArgs, reply: Reply, completing: Option<String>) {
        let now = self.now();
        let found = self.convs.get(token).and_then(|c| Some((c.head_or_fresh()?, c.state.clone())));
        let Some((mut head, mut state)) = found else {
            return self.answer_no_job(reply, completing);
        };
        head.lease = Some(self.new_lease(&args.worker_id, now));
        state.head = Some(head);
        let worker_id = args.worker_id.to_string();
        self.write_conv(token, state, After::Claim { worker_id, reply, args, completing });
    }
}
