//! View change: a backup that suspects the primary moves to the next view; on a quorum of
//! StartViewChange each replica sends the new primary its log head (DoViewChange); the new
//! primary picks the log of the highest normal view, ties broken by op, and starts the view.

use std::borrow::Borrow;
use std::collections::HashMap;

use bytes::Bytes;
use vsr_probes as probe;
use vsr_probes::{Command, RejectReason, ViewChangeReason};

use super::repair::decode_suffix;
use super::{Destination, REPLICAS_MAX, Replica, Status};
use crate::message::{
    Entry, Header, LIST_PREFIX_SIZE, Message, OpHeader, decode_do_view_change_body,
    encode_do_view_change_body, encode_entries,
};
use crate::storage::Storage;

/// A replica's log head as it reported it for the new view.
#[derive(Debug)]
pub(super) struct DoViewChange {
    pub(super) log_view: u64,
    pub(super) op: u64,
    pub(super) commit: u64,
    pub(super) head_checksum: u64,
    /// What the sender says about each of the newest ops of its log, ending at its head.
    pub(super) headers: Vec<OpHeader>,
    pub(super) entries: Vec<Entry>,
}

#[derive(Debug)]
pub(super) struct ViewChangeState {
    /// When this view change (or the recovery that ends in a view) began.
    pub(super) started_ns: u64,
    /// How long this view change may take before this replica moves on to the next view:
    /// doubled with every view change in a row that timed out, plus jitter, so replicas that
    /// time out together do not stay in step.
    pub(super) timeout_ns: u64,
    /// View changes in a row that timed out; reset in normal status.
    pub(super) attempts: u32,
    /// A bit per replica that asked for this view, own included.
    pub(super) start_view_change_votes: u8,
    pub(super) do_view_change_sent: bool,
    /// On the new primary: the DoViewChange of each replica, own included.
    pub(super) do_view_changes: HashMap<u8, DoViewChange>,
    pub(super) last_sent_ns: u64,
    /// In normal status: the highest view each replica asked for with a StartViewChange while
    /// it was itself still normal, if above ours, and when it last asked. A normal replica
    /// leaves its view only when a quorum asks within a timeout, so one replica that cannot
    /// hear the primary (a one-way link) cannot drag the others out of a working view.
    pub(super) requested_views: [RequestedView; REPLICAS_MAX as usize],
    /// In normal status: this backup has not heard its primary for a timeout, and why; it asks
    /// for the next view, and counts as one vote for it.
    pub(super) suspicion: Option<ViewChangeReason>,
    /// This replica may have acknowledged ops up to here that it no longer holds (a corrupt
    /// record, entries of an earlier process or of the replica it replaced), so it nacks only
    /// what it lacks above it. `u64::MAX` from open until it first holds a whole chain to
    /// its head: a replica acknowledges an op only while it does, so from then on it
    /// acknowledged nothing it lacks above that head.
    pub(super) nack_floor: u64,
}

impl ViewChangeState {
    pub(super) fn new(now_ns: u64, timeout_ns: u64) -> ViewChangeState {
        ViewChangeState {
            started_ns: now_ns,
            timeout_ns,
            attempts: 0,
            start_view_change_votes: 0,
            do_view_change_sent: false,
            do_view_changes: HashMap::new(),
            last_sent_ns: now_ns,
            requested_views: [RequestedView::default(); REPLICAS_MAX as usize],
            suspicion: None,
            nack_floor: u64::MAX,
        }
    }

    /// Normal status reached: what counted toward leaving the old view no longer does.
    pub(super) fn reset_for_normal(&mut self) {
        self.attempts = 0;
        self.requested_views = [RequestedView::default(); REPLICAS_MAX as usize];
        self.suspicion = None;
    }
}

/// A normal replica's request for a later view.
#[derive(Debug, Clone, Copy, Default)]
pub(super) struct RequestedView {
    pub(super) view: u64,
    pub(super) received_ns: u64,
}

/// View changes in a row wait at most this many doublings of the view-change timeout.
const BACKOFF_DOUBLINGS_MAX: u32 = 2;
/// `aux` of a StartViewChange sent in view-change status; 0 is a normal replica's request.
const START_VIEW_CHANGE_IN_VIEW_CHANGE: u64 = 1;

impl<S: Storage> Replica<S> {
    pub(super) fn start_view_change(&mut self, now_ns: u64, view: u64, reason: ViewChangeReason) {
        assert!(view > self.view, "views only move forward");
        let (replica_id, view_old) = (self.config.replica, self.view);
        probe::view_change_start(|| (replica_id, view_old, view, reason as u8));
        // Those who asked for exactly this view while we were normal have voted for it.
        let mut votes = 1 << self.config.replica;
        if self.status == Status::Normal {
            self.log_view = self.view;
            for (replica, requested) in self.view_change.requested_views.iter().enumerate() {
                if requested.view == view && self.request_fresh(now_ns, requested) {
                    votes |= 1 << replica;
                }
            }
        }
        self.view = view;
        self.status = Status::ViewChange;
        self.view_change.started_ns = now_ns;
        self.view_change.timeout_ns = self.view_change_timeout_ns();
        self.view_change.start_view_change_votes = votes;
        self.view_change.do_view_change_sent = false;
        self.view_change.do_view_changes.clear();
        self.view_change.requested_views = [RequestedView::default(); REPLICAS_MAX as usize];
        self.view_change.suspicion = None;
        self.abandon_primary_state();
        self.superblock_dirty = true;
        self.send_start_view_change(now_ns);
        self.maybe_send_do_view_change(now_ns);
    }

    /// A request for a later view counts while its sender keeps asking: one that heard its
    /// primary again stops, and its old request must not combine with a later one.
    fn request_fresh(&self, now_ns: u64, requested: &RequestedView) -> bool {
        now_ns.saturating_sub(requested.received_ns) <= self.config.view_change_timeout_ns
    }

    /// The view-change timeout with backoff for the attempts so far, and jitter.
    pub(super) fn view_change_timeout_ns(&mut self) -> u64 {
        let base = self.config.view_change_timeout_ns;
        let doublings = self.view_change.attempts.min(BACKOFF_DOUBLINGS_MAX);
        (base << doublings) + self.prng.below(base / 2 + 1)
    }

    /// A normal backup that has not heard its primary: asks for the next view, and leaves its
    /// own once a quorum asks too.
    pub(super) fn suspect_primary(&mut self, now_ns: u64, reason: ViewChangeReason) {
        assert!(self.status == Status::Normal && !self.is_primary());
        self.view_change.suspicion = Some(reason);
        self.view_change.last_sent_ns = now_ns;
        let mut header = self.header(Command::StartViewChange);
        header.view = self.view + 1;
        self.broadcast(Message::new(header, Bytes::new()));
        self.maybe_leave_view(now_ns);
    }

    /// Leaves the normal view when a quorum, this replica's suspicion included, asks for a
    /// later one; joins the highest view asked for.
    fn maybe_leave_view(&mut self, now_ns: u64) {
        assert_eq!(self.status, Status::Normal);
        let me = self.config.replica as usize;
        let asked = self
            .view_change
            .requested_views
            .iter()
            .enumerate()
            .filter(|(replica, requested)| {
                *replica != me
                    && requested.view > self.view
                    && self.request_fresh(now_ns, requested)
            })
            .map(|(_, requested)| requested.view);
        // A primary that cannot commit supports leaving its view as much as a backup that
        // cannot hear it.
        let abdicating = self.is_primary() && self.primary_abdicating(now_ns);
        let suspecting =
            (self.view_change.suspicion.is_some() || abdicating).then_some(self.view + 1);
        let votes = asked.clone().count() + usize::from(suspecting.is_some());
        if votes < self.config.quorum() {
            return;
        }
        let view = asked.chain(suspecting).max().unwrap();
        let reason = self
            .view_change
            .suspicion
            .unwrap_or(ViewChangeReason::HigherView);
        self.start_view_change(now_ns, view, reason);
    }

    /// Clients whose requests were queued here retry against the new primary.
    pub(super) fn abandon_primary_state(&mut self) {
        // No evidence against a quorum until this replica leads again and an op stalls.
        self.pipeline.clear(self.config.quorum() as u8);
    }

    /// Sent in view-change status: unlike a normal replica's request (`suspect_primary`), it
    /// says a quorum has left the old view (or an operator asked), so normal replicas join.
    pub(super) fn send_start_view_change(&mut self, now_ns: u64) {
        assert_eq!(self.status, Status::ViewChange);
        self.view_change.last_sent_ns = now_ns;
        let mut header = self.header(Command::StartViewChange);
        header.aux = START_VIEW_CHANGE_IN_VIEW_CHANGE;
        self.broadcast(Message::new(header, Bytes::new()));
    }

    pub(super) fn on_start_view_change(&mut self, now_ns: u64, header: &Header) {
        self.assert_invariants();
        assert_eq!(header.command, Command::StartViewChange);
        if self.status == Status::Recovering || header.view < self.view {
            return;
        }
        if self.status == Status::Normal {
            if header.view == self.view {
                // It missed the StartView of the view we are in.
                return self.send_start_view_to(header.view, header.replica);
            }
            // Joined at once: a view change a quorum has begun, or a request from a replica
            // already normal in a later view than ours, which a quorum has started.
            let in_view_change = header.aux == START_VIEW_CHANGE_IN_VIEW_CHANGE;
            if in_view_change || header.view > self.view + 1 {
                return self.start_view_change(now_ns, header.view, ViewChangeReason::HigherView);
            }
            let requested = &mut self.view_change.requested_views[header.replica as usize];
            requested.view = requested.view.max(header.view);
            requested.received_ns = now_ns;
            return self.maybe_leave_view(now_ns);
        }
        if header.view > self.view {
            self.start_view_change(now_ns, header.view, ViewChangeReason::HigherView);
        }
        if self.status == Status::ViewChange && header.view == self.view {
            self.view_change.start_view_change_votes |= 1 << header.replica;
            self.maybe_send_do_view_change(now_ns);
        }
    }

    pub(super) fn maybe_send_do_view_change(&mut self, now_ns: u64) {
        if self.view_change.do_view_change_sent
            || (self.view_change.start_view_change_votes.count_ones() as usize)
                < self.config.quorum()
        {
            return;
        }
        self.view_change.do_view_change_sent = true;
        let do_view_change = self.own_do_view_change();
        let primary = self.config.primary_of(self.view);
        if primary == self.config.replica {
            self.view_change
                .do_view_changes
                .insert(primary, do_view_change);
            self.maybe_start_view(now_ns);
        } else {
            let message = self.do_view_change_message(&do_view_change);
            self.send(Destination::Replica(primary), message);
        }
    }

    pub(super) fn own_do_view_change(&self) -> DoViewChange {
        DoViewChange {
            log_view: self.log_view,
            op: self.op,
            commit: self.commit_max.max(self.commit).min(self.op),
            head_checksum: self.head_checksum,
            headers: self.op_headers(),
            entries: self.suffix(self.commit).into_iter().cloned().collect(),
        }
    }

    /// Our verified entries above `after`: the newest that fit in one view-change message.
    pub(super) fn suffix(&self, after: u64) -> Vec<&Entry> {
        let low = after.max(self.chain_low);
        self.fit_suffix(self.entries.range(low + 1..).rev().map(|(_, entry)| entry))
    }

    /// Of a contiguous run of entries ending at the head, given newest first, the newest that
    /// fit in one DoViewChange, StartView or RecoveryResponse (`suffix_max` entries and
    /// `suffix_bytes_max` bytes), oldest first. Older ones travel by repair.
    pub(super) fn fit_suffix<E: Borrow<Entry>>(
        &self,
        newest_first: impl Iterator<Item = E>,
    ) -> Vec<E> {
        let mut bytes = LIST_PREFIX_SIZE;
        let mut suffix: Vec<E> = newest_first
            .take(self.config.suffix_max as usize)
            .take_while(|entry| {
                bytes += entry.borrow().encoded_size();
                bytes <= self.config.suffix_bytes_max
            })
            .collect();
        suffix.reverse();
        suffix
    }

    pub(super) fn do_view_change_message(&self, do_view_change: &DoViewChange) -> Message {
        let mut header = self.header(Command::DoViewChange);
        header.op = do_view_change.op;
        header.commit = do_view_change.commit;
        header.context = do_view_change.head_checksum;
        header.aux = do_view_change.log_view;
        let entries: Vec<&Entry> = do_view_change.entries.iter().collect();
        Message::new(
            header,
            encode_do_view_change_body(&do_view_change.headers, &entries),
        )
    }

    pub(super) fn on_do_view_change(
        &mut self,
        now_ns: u64,
        message: &Message,
    ) -> Result<(), RejectReason> {
        self.assert_invariants();
        assert_eq!(message.header.command, Command::DoViewChange);
        let header = message.header;
        if self.status == Status::Recovering || header.view < self.view {
            return Ok(());
        }
        if self.config.primary_of(header.view) != self.config.replica {
            return Err(RejectReason::InvalidFields);
        }
        let (headers, entries) = decode_do_view_change_body(&message.body)?;
        if headers.len() as u64 > header.op {
            return Err(RejectReason::InvalidFields);
        }
        let entries = decode_suffix(&entries, header.op, header.context)?;
        if header.view > self.view {
            self.start_view_change(now_ns, header.view, ViewChangeReason::HigherView);
        }
        if self.status != Status::ViewChange {
            // Already started the view: the sender missed our StartView.
            self.send_start_view_to(header.view, header.replica);
            return Ok(());
        }
        self.view_change.do_view_changes.insert(
            header.replica,
            DoViewChange {
                log_view: header.aux,
                op: header.op,
                commit: header.commit,
                head_checksum: header.context,
                headers,
                entries,
            },
        );
        self.view_change.start_view_change_votes |= 1 << header.replica;
        self.maybe_send_do_view_change(now_ns);
        self.maybe_start_view(now_ns);
        Ok(())
    }

    pub(super) fn maybe_start_view(&mut self, now_ns: u64) {
        if self.view_change.do_view_changes.len() < self.config.quorum()
            || !self
                .view_change
                .do_view_changes
                .contains_key(&self.config.replica)
        {
            return;
        }
        let (commit_min, commit_max) = self
            .view_change
            .do_view_changes
            .values()
            .fold((u64::MAX, 0), |(low, high), dvc| {
                (low.min(dvc.commit), high.max(dvc.commit))
            });
        let best = self
            .view_change
            .do_view_changes
            .iter()
            .max_by_key(|(replica, dvc)| (dvc.log_view, dvc.op, **replica == self.config.replica))
            .map(|(replica, _)| *replica)
            .unwrap();
        let do_view_changes = std::mem::take(&mut self.view_change.do_view_changes);
        let best = &do_view_changes[&best];
        let commit_floor = commit_max.max(self.commit).max(self.commit_max);
        let (head_op, head_checksum) = self.head_after_nacks(best, &do_view_changes, commit_floor);
        if head_op != self.op || head_checksum != self.head_checksum {
            let entries = best
                .entries
                .iter()
                .filter(|entry| entry.op <= head_op)
                .cloned()
                .collect();
            self.install_head(now_ns, head_op, head_checksum, entries);
        }
        self.commit_max = self.commit_max.max(commit_max);
        self.enter_normal(now_ns);
        self.adopt_pipeline(now_ns);
        let start_view = self.start_view_message(commit_min);
        self.broadcast(start_view);
        self.last_sent_to_backups_ns = now_ns;
        self.walk_chain(now_ns);
        self.commit_primary(now_ns);
    }

    pub(super) fn start_view_message(&self, after: u64) -> Message {
        let mut header = self.header(Command::StartView);
        header.op = self.op;
        header.commit = self.commit_max.max(self.commit);
        header.context = self.head_checksum;
        Message::new(header, encode_entries(&self.suffix(after)))
    }

    pub(super) fn enter_normal(&mut self, now_ns: u64) {
        self.view_change.reset_for_normal();
        let (replica_id, view, latency_ns) = (
            self.config.replica,
            self.view,
            now_ns.saturating_sub(self.view_change.started_ns),
        );
        self.status = Status::Normal;
        self.log_view = self.view;
        self.last_heard_primary_ns = now_ns;
        self.superblock_dirty = true;
        let is_primary = self.is_primary() as u8;
        probe::view_change_done(|| (replica_id, view, latency_ns, is_primary));
    }

    pub(super) fn on_start_view(
        &mut self,
        now_ns: u64,
        message: &Message,
    ) -> Result<(), RejectReason> {
        self.assert_invariants();
        assert_eq!(message.header.command, Command::StartView);
        let header = message.header;
        if self.config.primary_of(header.view) != header.replica {
            return Err(RejectReason::InvalidFields);
        }
        let stale =
            header.view < self.view || (header.view == self.view && self.status == Status::Normal);
        if self.status == Status::Recovering || stale {
            return Ok(());
        }
        let entries = decode_suffix(&message.body, header.op, header.context)?;
        if header.op < self.commit {
            return Err(RejectReason::InvalidFields);
        }
        if self.status == Status::Normal {
            self.view_change.started_ns = now_ns;
        }
        self.view = header.view;
        self.abandon_primary_state();
        if header.op != self.op || header.context != self.head_checksum {
            self.install_head(now_ns, header.op, header.context, entries);
        }
        self.commit_max = self.commit_max.max(header.commit);
        self.enter_normal(now_ns);
        self.walk_chain(now_ns);
        self.commit_backup(now_ns);
        self.acknowledge_uncommitted();
        Ok(())
    }

    pub(super) fn request_start_view(&mut self, view: u64, primary: u8) {
        let mut header = self.header(Command::RequestStartView);
        header.view = view;
        self.send(
            Destination::Replica(primary),
            Message::new(header, Bytes::new()),
        );
    }

    pub(super) fn on_request_start_view(&mut self, header: &Header) {
        self.assert_invariants();
        assert_eq!(header.command, Command::RequestStartView);
        self.send_start_view_to(header.view, header.replica);
    }

    /// Sends a replica that missed it the StartView of `view`, if this replica leads that view.
    fn send_start_view_to(&mut self, view: u64, replica: u8) {
        if view == self.view && self.is_primary() {
            let start_view = self.start_view_message(self.commit);
            self.send(Destination::Replica(replica), start_view);
        }
    }

    pub(super) fn on_view_change_tick(&mut self, now_ns: u64) {
        self.assert_invariants();
        let quorum_left =
            self.view_change.start_view_change_votes.count_ones() as usize >= self.config.quorum();
        // Only a view change that a quorum joined moves on to the next view when it stalls (its
        // new primary may be gone); one that nobody joined keeps asking for the same view, so a
        // replica alone never runs its view away from the cluster's.
        if quorum_left
            && now_ns.saturating_sub(self.view_change.started_ns) > self.view_change.timeout_ns
        {
            self.view_change.attempts += 1;
            return self.start_view_change(
                now_ns,
                self.view + 1,
                ViewChangeReason::ViewChangeTimeout,
            );
        }
        if now_ns.saturating_sub(self.view_change.last_sent_ns) > self.config.retry_interval_ns {
            self.send_start_view_change(now_ns);
            if self.view_change.do_view_change_sent
                && !self
                    .view_change
                    .do_view_changes
                    .contains_key(&self.config.replica)
            {
                let message = self.do_view_change_message(&self.own_do_view_change());
                let primary = self.config.primary_of(self.view);
                self.send(Destination::Replica(primary), message);
            }
        }
    }
}
