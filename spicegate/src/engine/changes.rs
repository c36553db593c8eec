//! Putting a change in force: a new policy, new addresses, or the access
//! of a few (vm, uid) pairs, each the cheapest atomic way.

use super::*;

/// A reload put in force. The control handler renders `diff` as the
/// `changes` lines of [`crate::proto::ReloadAnswer`] (names need NSS,
/// which the engine thread does not wait on).
pub struct Reloaded {
    pub summary: String,
    pub diff: Diff,
    pub sha256: String,
}

impl Engine {
    /// Compiles and installs; on error nothing in the kernel changed.
    pub(super) fn apply(
        &mut self,
        loaded: Option<Loaded>,
        local: Option<LocalAddrs>,
    ) -> anyhow::Result<Arc<Compiled>> {
        let started = Instant::now();
        let policy = loaded.as_ref().map_or(&self.loaded.policy, |l| &l.policy);
        let local_ref = local.as_ref().unwrap_or(&self.local);
        let clock = self.clock();
        let scheduled = schedule::scheduled(policy, clock, &schedule::zone(policy), self.console);
        let temp = self.grants.active(u64::try_from(clock).unwrap_or(0));
        let dynamic = Dynamic {
            temp: &temp,
            scheduled: scheduled.clone(),
            console: self.console,
        };
        let t = Instant::now();
        let compiled = compile(policy, local_ref, &dynamic)?;
        self.phases.push(("compile", t.elapsed()));
        self.scheduled = scheduled;
        let t = Instant::now();
        // The uids of the policy in force were named when it was applied
        // (and those of grants and the console when they came): only the
        // VMs a new policy adds or changes can bring new ones.
        let named: Vec<u32> = match &loaded {
            Some(l) => new_policy_uids(&self.loaded.policy, &l.policy).collect(),
            None => Vec::new(),
        };
        let naming = t.elapsed();
        let t = Instant::now();
        self.install(&compiled, started)?;
        self.phases.push(("install", t.elapsed()));
        let t = Instant::now();
        if let Err(e) = self.kernel.name_uids(named.into_iter()) {
            log::warn!("could not give the policy's uids their own denial budget: {e:#}");
        }
        self.phases.push(("names", naming + t.elapsed()));
        let t = Instant::now();
        *self
            .vm_names
            .write()
            .unwrap_or_else(std::sync::PoisonError::into_inner) = compiled.vm_names.clone();
        let old = std::mem::replace(&mut self.compiled, Arc::new(compiled));
        if let Some(l) = loaded {
            *self
                .settings
                .write()
                .unwrap_or_else(std::sync::PoisonError::into_inner) = l.policy.settings.clone();
            self.loaded = l;
            self.loaded_at = now_unix();
            self.source = Source::File;
            self.hand_over_sources(true);
        }
        if let Some(l) = local {
            self.local = l;
        }
        self.phases.push(("keep", t.elapsed()));
        let t = Instant::now();
        self.sweep();
        self.phases.push(("sweep", t.elapsed()));
        Ok(old)
    }

    /// Puts `new` in force, atomically, the cheapest way: when only grants
    /// changed, and few, through the overlays of the table in force (cost
    /// in proportion to the change); otherwise a new table. On error the
    /// kernel decides as before.
    /// `started`: when working out the change began (the daemon's side of
    /// it, for `status` `table.last_change.ms`).
    pub(super) fn install(&mut self, new: &Compiled, started: Instant) -> anyhow::Result<()> {
        let t = started;
        let limit = spicegate_common::OVERLAY_MAX;
        let (generation, _, writes_before) = self.kernel.table_stats();
        if generation != 0
            && let Some(delta) = grant_delta(&self.compiled, new, limit)
            && self.kernel.apply_delta(&delta)?
        {
            let (_, len, writes) = self.kernel.table_stats();
            self.note_change("overlay", delta.len(), len, writes - writes_before, t);
            return Ok(());
        }
        self.kernel.install(new)?;
        let (_, len, writes) = self.kernel.table_stats();
        self.note_change("table", new.grant_count(), len, writes - writes_before, t);
        Ok(())
    }

    pub(super) fn note_change(
        &mut self,
        how: &str,
        grants: usize,
        overlay: usize,
        writes: u64,
        t: Instant,
    ) {
        let ms = t.elapsed().as_secs_f64() * 1e3;
        log::debug!(
            "kernel change: {how}, {grants} grant(s), overlay {overlay} entries, {writes} map writes, {ms:.2} ms"
        );
        self.last_change = Some(LastChange {
            grants,
            how: how.to_owned(),
            map_writes: writes,
            ms: (ms * 100.0).round() / 100.0,
            overlay_entries: overlay,
        });
    }

    /// A grant, revoke, expiry, schedule edge or console switch: works out
    /// the access of the (vm, uid) `pairs` again (plus those whose schedule
    /// window opened or closed, and the console user's when it changed)
    /// and puts the result in force. On error nothing changed.
    pub(super) fn apply_pairs(
        &mut self,
        pairs: BTreeSet<(String, u32)>,
        console_changed: bool,
    ) -> anyhow::Result<()> {
        let policy = &self.loaded.policy;
        let scheduled =
            schedule::scheduled(policy, self.clock(), &schedule::zone(policy), self.console);
        self.apply_pairs_scheduled(pairs, console_changed, scheduled)
    }

    /// [`Engine::apply_pairs`] with the schedule windows open now already
    /// worked out (the tick has them).
    pub(super) fn apply_pairs_scheduled(
        &mut self,
        mut pairs: BTreeSet<(String, u32)>,
        console_changed: bool,
        scheduled: BTreeSet<(String, u32)>,
    ) -> anyhow::Result<()> {
        let started = Instant::now();
        self.phases.clear();
        let clock = self.clock();
        let policy = &self.loaded.policy;
        pairs.extend(self.scheduled.symmetric_difference(&scheduled).cloned());
        let temp = self.grants.active(u64::try_from(clock).unwrap_or(0));
        let dynamic = Dynamic {
            temp: &temp,
            scheduled,
            console: self.console,
        };
        let t = Instant::now();
        let next = recompile_pairs(&self.compiled, policy, &dynamic, &pairs, console_changed)?;
        self.phases.push(("compile", t.elapsed()));
        let t = Instant::now();
        self.install(&next, started)?;
        self.phases.push(("install", t.elapsed()));
        let high = pairs
            .iter()
            .map(|(_, u)| *u)
            .chain(dynamic.console)
            .filter(|u| *u >= spicegate_common::RATE_LOW_UIDS);
        if let Err(e) = self.kernel.name_uids(high) {
            log::warn!("could not give the policy's uids their own denial budget: {e:#}");
        }
        self.scheduled = dynamic.scheduled;
        self.compiled = Arc::new(next);
        self.sweep();
        Ok(())
    }

    /// Has the sweeper close established connections the table in force
    /// refuses (unless `end_sessions = false`), now and once more a second
    /// later. Returns at once.
    pub(super) fn sweep(&self) {
        if self.loaded.policy.settings.end_sessions {
            self.sweeper.sweep(Arc::clone(&self.compiled));
        }
    }

    /// `reload` and SIGHUP.
    /// `loaded` was read and parsed off this thread (see [`Loader`]).
    pub fn reload(
        &mut self,
        why: &str,
        loaded: Result<Loaded, String>,
    ) -> Result<Reloaded, String> {
        let now = now_unix();
        let start = Instant::now();
        self.phases.clear();
        let result = loaded.and_then(|l| {
            let sha = l.sha256.clone();
            self.apply(Some(l), None)
                .map(|old| (old, sha))
                .map_err(|e| format!("{e:#}"))
        });
        match result {
            Ok((old, sha)) => {
                let t = Instant::now();
                let diff = Diff::of_tables(&old, &self.compiled);
                drop(old);
                self.trim_soon();
                self.phases.push(("diff", t.elapsed()));
                if let Some(w) = self.loaded.policy.listener_warning() {
                    log::warn!("{w}");
                }
                log::info!(
                    SPICEGATE_EVENT = Event::Reload;
                    "reloaded policy {} ({why}) in {} ms: {}",
                    self.cfg.policy_path.display(),
                    start.elapsed().as_millis(),
                    self.summary()
                );
                log::debug!(
                    "reload phases: {}",
                    self.phases
                        .iter()
                        .map(|(what, d)| format!("{what} {:.1} ms", d.as_secs_f64() * 1e3))
                        .collect::<Vec<_>>()
                        .join(", ")
                );
                self.names.changes("access change: ", diff.clone());
                self.metrics.reload_ok(now, start.elapsed());
                self.last_reload = LastReload {
                    at: rfc3339(now),
                    at_unix: now,
                    message: format!("reloaded ({why})"),
                    ok: true,
                };
                Ok(Reloaded {
                    summary: self.summary(),
                    diff,
                    sha256: sha,
                })
            }
            Err(e) => {
                log::error!(SPICEGATE_EVENT = Event::ReloadRefused; "reload refused ({why}), the previous policy stays in force:\n{e}");
                self.metrics.reload_failed();
                self.last_reload = LastReload {
                    at: rfc3339(now),
                    at_unix: now,
                    message: e.clone(),
                    ok: false,
                };
                Err(format!("{e}\nthe previous policy stays in force"))
            }
        }
    }

    /// This machine's addresses as the watcher read them; reapplies when
    /// they changed.
    pub fn addresses(&mut self, now: LocalAddrs) {
        if now == self.local {
            return;
        }
        match self.apply(None, Some(now)) {
            Ok(_) => log::info!("this machine's addresses changed; local endpoints updated"),
            Err(e) => log::error!(
                "this machine's addresses changed but the table could not be updated: {e:#}"
            ),
        }
    }
}
