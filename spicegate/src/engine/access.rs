//! Temporary grants and revokes: saved, then put in force (or refused and
//! nothing changed).

use super::*;

impl Engine {
    pub(super) fn grant(
        &mut self,
        uid: u32,
        user: String,
        vm: String,
        for_secs: Option<u64>,
        by: u32,
    ) -> Result<GrantAnswer, String> {
        if let Err(e) = &self.state_ok {
            return Err(format!(
                "grant refused: temporary grants are off because {e}; fix it and restart the daemon"
            ));
        }
        if !self.loaded.policy.vms.contains_key(&vm) {
            let known: Vec<&str> = self.loaded.policy.vms.keys().map(String::as_str).collect();
            return Err(format!(
                "no vm `{vm}` in the policy (vms: {})",
                known.join(", ")
            ));
        }
        if let Some(s) = for_secs
            && !(1..=crate::grants::MAX_GRANT_SECS).contains(&s)
        {
            return Err(format!(
                "a temporary grant lasts from 1 second to 10 years ({} s), not {s} s; for longer, put the user in the policy",
                crate::grants::MAX_GRANT_SECS
            ));
        }
        let now = u64::try_from(self.clock()).unwrap_or(0);
        let expires = for_secs.map(|s| now.saturating_add(s));
        let before = self.grants.grants.clone();
        self.grants.upsert(TempGrant {
            uid,
            user: user.clone(),
            vm: vm.clone(),
            expires,
            granted_at: now,
            granted_by: by,
        });
        // Saved first: a grant that could not survive a restart is refused
        // rather than half-applied.
        if let Err(e) = self.grants.save() {
            self.grants.grants = before;
            return Err(format!(
                "grant refused, nothing changed: cannot save it: {e:#}"
            ));
        }
        if let Err(e) = self.apply_pairs([(vm.clone(), uid)].into(), false) {
            self.grants.grants = before;
            let _ = self.grants.save();
            return Err(format!("grant not applied, nothing changed: {e:#}"));
        }
        let until = expires.map_or_else(
            || "until revoked".to_owned(),
            |e| format!("until {}", rfc3339(e)),
        );
        log::info!(
            "temporary grant: {user} ({uid}) may open vm {vm} {until} (granted by uid {by})"
        );
        Ok(GrantAnswer {
            expires: expires.map(rfc3339),
            expires_unix: expires,
            uid,
            user,
            vm,
        })
    }

    pub(super) fn revoke(
        &mut self,
        uid: u32,
        user: String,
        vm: String,
    ) -> Result<RevokeAnswer, String> {
        let before = self.grants.grants.clone();
        if !self.grants.remove(uid, &vm) {
            return Err(format!(
                "{user} has no temporary grant on vm `{vm}` (policy grants are changed in the policy file)"
            ));
        }
        if let Err(e) = self.apply_pairs([(vm.clone(), uid)].into(), false) {
            self.grants.grants = before;
            return Err(format!("revoke not applied, nothing changed: {e:#}"));
        }
        // Access is gone in the kernel already; a failed save only means the
        // grant would come back after a restart, so say it loudly.
        if let Err(e) = self.grants.save() {
            log::error!(
                "temporary grant revoked in the kernel but {e:#}; it would return after a restart: fix the state directory and revoke again"
            );
            return Err(format!(
                "revoked in the kernel, but not saved (it would return after a restart): {e:#}"
            ));
        }
        log::info!("temporary grant revoked: {user} ({uid}) on vm {vm}");
        Ok(RevokeAnswer { uid, user, vm })
    }
}
