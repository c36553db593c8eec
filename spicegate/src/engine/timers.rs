//! What the clock drives: the watchdog, expiries, schedule edges, the
//! console user, handing memory back.

use super::*;

impl Engine {
    /// Once a second: checks that the programs are still attached and the
    /// maps still pinned, and restores them if someone removed them. This is
    /// the "small scheduled job checking the rights settings" of the
    /// iptables days, built in.
    pub fn watchdog(&mut self) {
        // Pins first: re-attaching pins the links into the same directory.
        match self.kernel.repin_missing() {
            Ok(names) if !names.is_empty() => {
                self.metrics.repaired();
                log::error!(
                    SPICEGATE_EVENT = Event::Tampering;
                    "TAMPERING: pins of {} were removed by someone else; pinned again in {}",
                    names.join(", "),
                    self.cfg.paths.dir.display()
                );
            }
            Ok(_) => {}
            Err(e) => {
                log::error!(SPICEGATE_EVENT = Event::Tampering; "TAMPERING: a map pin was removed and could not be restored: {e:#}")
            }
        }
        let in_force = match self.kernel.table_intact() {
            Ok(true) => true,
            Ok(false) => {
                log::error!(
                    SPICEGATE_EVENT = Event::Tampering;
                    "TAMPERING: the rule table in {} (or its overlays) was emptied, replaced or written by someone else; installing the policy again",
                    self.cfg.paths.policy().display()
                );
                let compiled = Arc::clone(&self.compiled);
                // Fresh overlays too: someone may have written into ours.
                self.kernel.discard_overlays();
                match self.kernel.install(&compiled) {
                    Ok(()) => {
                        self.metrics.repaired();
                        log::error!(SPICEGATE_EVENT = Event::Tampering; "TAMPERING: rule table restored");
                        true
                    }
                    Err(e) => {
                        log::error!(SPICEGATE_EVENT = Event::Tampering; "TAMPERING: could not restore the rule table: {e:#}");
                        false
                    }
                }
            }
            Err(e) => {
                log::error!(SPICEGATE_EVENT = Event::Tampering; "TAMPERING: cannot read the policy slot: {e:#}");
                false
            }
        };
        self.metrics.set_table_in_force(in_force);
        self.report_unmarked();
        if !kernel::attached(&self.cfg.paths, &self.cfg.cgroup) {
            log::error!(
                SPICEGATE_EVENT = Event::Tampering;
                "TAMPERING: spicegate's connect programs are no longer attached to {} (detached or unpinned by someone else); re-attaching",
                self.cfg.cgroup.display()
            );
            let compiled = Arc::clone(&self.compiled);
            match self
                .kernel
                .install(&compiled)
                .and_then(|()| self.kernel.attach(&self.cfg.cgroup))
            {
                Ok(()) => {
                    self.metrics.repaired();
                    log::error!(
                        SPICEGATE_EVENT = Event::Tampering;
                        "TAMPERING: enforcement restored on {}",
                        self.cfg.cgroup.display()
                    );
                }
                Err(e) => {
                    log::error!(SPICEGATE_EVENT = Event::Tampering; "TAMPERING: could not restore enforcement: {e:#}")
                }
            }
        }
    }

    /// Says when the kernel let connects through without the mark the
    /// sweep needs to close them when access ends (no memory for socket
    /// storage, with the fast marks full).
    fn report_unmarked(&mut self) {
        let Ok(drops) = self.kernel.drops() else {
            return;
        };
        if drops.mark_failed > self.unmarked_seen {
            log::error!(
                "UNMARKED: {} connect(s) to guarded endpoints were let through but could not be marked (their mark slots were taken, the {} fast marks are full, and the kernel had no memory for socket storage): those connections will not be closed when access ends",
                drops.mark_failed - self.unmarked_seen,
                spicegate_common::GRANTED_ENTRIES
            );
            self.unmarked_seen = drops.mark_failed;
        }
    }

    /// Several times a second: expiries, schedule windows and the periodic
    /// re-resolution of hostnames and groups. Everything is computed from the
    /// clock now, so a clock jump or a DST change takes effect at once.
    pub fn tick(&mut self) {
        if self.trim_at.is_some_and(|t| Instant::now() >= t) {
            self.trim_at = None;
            release_free_memory();
        }
        self.expire_grants();
        let clock = self.clock();
        let scheduled = schedule::scheduled(
            &self.loaded.policy,
            clock,
            &schedule::zone(&self.loaded.policy),
            self.console,
        );
        if scheduled != self.scheduled {
            let diff = Diff::of_pairs(&self.scheduled, &scheduled);
            match self.apply_pairs_scheduled(BTreeSet::new(), false, scheduled) {
                Ok(()) => self.names.changes("schedule: ", diff),
                Err(e) => log::error!("schedule change not applied: {e:#}"),
            }
        }
    }

    /// The resolver thread's result: applies it when names changed and it
    /// was made for the policy still in force.
    pub(super) fn resolved(&mut self, sha256: &str, policy: Policy) {
        // The policy read again is dropped or replaced on this thread: its
        // heap goes back to the kernel soon after, as after a reload.
        self.trim_soon();
        if sha256 != self.loaded.sha256 {
            return;
        }
        let was: BTreeSet<String> = self
            .loaded
            .policy
            .unresolved
            .iter()
            .map(|u| u.name.clone())
            .collect();
        let now: BTreeSet<String> = policy.unresolved.iter().map(|u| u.name.clone()).collect();
        for name in was.difference(&now) {
            log::warn!("RESOLVED: {name} resolves again; the policy is enforced with it");
        }
        if !was.is_empty() && now.is_empty() {
            log::warn!("no longer degraded: every name of the policy resolves");
        }
        match policy {
            policy if policy == self.loaded.policy => {}
            policy => {
                let loaded = Loaded {
                    policy,
                    sources: self.loaded.sources.clone(),
                    sha256: self.loaded.sha256.clone(),
                };
                let source = self.source;
                match self.apply(Some(loaded), None) {
                    Ok(old) => {
                        self.names.changes(
                            "groups or hostnames changed: ",
                            Diff::of_tables(&old, &self.compiled),
                        );
                        log::info!(
                            "groups or hostnames changed; policy re-applied: {}",
                            self.summary()
                        );
                    }
                    Err(e) => log::error!(
                        "groups or hostnames changed but the table could not be updated: {e:#}"
                    ),
                }
                self.source = source;
            }
        }
    }

    /// The console user changed (logind).
    pub fn set_console(&mut self, uid: Option<u32>) {
        if uid == self.console {
            return;
        }
        self.names.console(self.console, uid);
        self.console = uid;
        if !self
            .loaded
            .policy
            .vms
            .values()
            .any(policy::Vm::uses_console)
        {
            return;
        }
        if let Err(e) = self.apply_pairs(BTreeSet::new(), true) {
            log::error!("console change not applied: {e:#}");
        }
    }

    /// Drops expired temporary grants and reapplies.
    pub(super) fn expire_grants(&mut self) {
        let now = u64::try_from(self.clock()).unwrap_or(0);
        if self.grants.next_expiry().is_none_or(|t| t > now) {
            return;
        }
        let gone = self.grants.expire(now);
        // Access ends first; the file follows on the writer's thread (an
        // expired grant left in it is dropped when it is read).
        let pairs = gone.iter().map(|g| (g.vm.clone(), g.uid)).collect();
        let applied = self.apply_pairs(pairs, false);
        if self.state_ok.is_ok() {
            self.grants.save_in_background();
        }
        match applied {
            Ok(_) => {
                for g in gone {
                    log::info!(
                        "temporary grant expired: {} ({}) on vm {}",
                        g.user,
                        g.uid,
                        g.vm
                    );
                }
            }
            Err(e) => log::error!(
                "expiring temporary grants failed; they stay in the kernel until the next apply: {e:#}"
            ),
        }
    }

    /// Hands freed heap back [`TRIM_DELAY`] from now (or sooner if a trim
    /// is due already): a large answer's document is freed by then.
    pub(super) fn trim_soon(&mut self) {
        let at = Instant::now() + TRIM_DELAY;
        self.trim_at = Some(self.trim_at.map_or(at, |t| t.min(at)));
    }
}
