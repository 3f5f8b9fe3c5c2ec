//! The store's anchor of an audit log: its head (seq and MAC), MACed under the audit key and
//! refreshed while the log is open, so records cut from the end while no server ran are found
//! at the next unseal ([`keyward_audit::AuditLog::check_anchor`]).

use std::sync::Arc;

/// Keep the store's anchor of `log` up to date: every `every`, if records were written since,
/// until the log is closed (sealed or stopped). `stored` is the anchor as last read (what
/// [`AuditLog::check_anchor`] was given). Records written in the last `every` before a crash
/// are not anchored.
pub(crate) async fn keep_anchored(
    log: std::sync::Weak<keyward_audit::AuditLog>,
    store: Arc<dyn keyward_core::store::Store>,
    name: String,
    mut stored: Option<Vec<u8>>,
    every: std::time::Duration,
) {
    let mut anchored = 0;
    loop {
        tokio::time::sleep(every).await;
        let Some((head, bytes)) = log.upgrade().map(|l| {
            let h = l.head();
            let b = l.anchor_bytes(&name, &h);
            (h, b)
        }) else {
            return;
        };
        if head.seq == anchored {
            continue;
        }
        let written = match &stored {
            Some(old) => store.replace_meta(&name, old, &bytes).await,
            None => store.put_meta_if_absent(&name, &bytes).await,
        };
        match written {
            Ok(true) => {
                anchored = head.seq;
                stored = Some(bytes);
            }
            // Changed meanwhile (another process on this file?): read it again next time.
            Ok(false) => stored = store.get_meta(&name).await.ok().flatten(),
            Err(e) => tracing::warn!(error = %e, "could not anchor the audit log in the store; will retry"),
        }
    }
}
