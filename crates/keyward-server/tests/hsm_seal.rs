//! The HSM seal against a real SoftHSM2 token (Debian `softhsm2`): an operator's seal wins over
//! every automatic unseal through the HSM (the start-up retries call the same
//! `Sealing::auto_unseal`) until an operator unseals again with the recovery shares.
//! SoftHSM2 reads `SOFTHSM2_CONF` when the library loads, so the body runs in a child process of
//! this test binary that has it set.
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

use std::process::Command;
use std::sync::Arc;

use keyward_crypto::SecretBytes;
use keyward_hsm::{Pkcs11Config, Pkcs11Seal};
use keyward_seal::Sealing;

use keyward_test_support::softhsm;

const CHILD: &str = "KEYWARD_SERVER_HSM_TEST_CHILD";
const TOKEN: &str = "keyward-seal-test";
const PIN: &str = "2468";

/// In the parent: make a token and run `name` again in a child that sees it. True in the child.
fn in_child_with_token(name: &str) -> bool {
    if std::env::var_os(CHILD).is_some() {
        return true;
    }
    let dir = tempfile::tempdir().unwrap();
    let conf = softhsm::softhsm_token(dir.path(), TOKEN, PIN);
    let out = Command::new(std::env::current_exe().unwrap())
        .args(["--exact", name, "--nocapture", "--test-threads=1"])
        .env("SOFTHSM2_CONF", &conf)
        .env(CHILD, "1")
        .output()
        .unwrap();
    let stdout = String::from_utf8_lossy(&out.stdout);
    eprintln!("{stdout}{}", String::from_utf8_lossy(&out.stderr));
    assert!(out.status.success(), "the test body failed in the child process");
    assert!(stdout.contains("1 passed"), "the child did not run the test body");
    false
}

#[test]
fn an_operator_seal_wins_over_automatic_unsealing() {
    if !in_child_with_token("an_operator_seal_wins_over_automatic_unsealing") {
        return;
    }
    let rt = tokio::runtime::Builder::new_multi_thread().enable_all().build().unwrap();
    rt.block_on(async {
        let dir = tempfile::tempdir().unwrap();
        let store: Arc<dyn keyward_core::store::Store> =
            Arc::new(keyward_store::SqliteStore::open(&dir.path().join("keyward.db")).unwrap());
        let cfg = Pkcs11Config {
            library: softhsm::SOFTHSM_LIB.into(),
            token_label: TOKEN.into(),
            key_label: "keyward-seal".into(),
            pin: SecretBytes::copy_from(PIN.as_bytes()),
        };
        let hsm = Arc::new(tokio::task::spawn_blocking(move || Pkcs11Seal::open(&cfg)).await.unwrap().unwrap());
        let sealing = Sealing::with_hsm(store.clone(), hsm.clone(), None);

        // Initialised and unsealed by the HSM; the shares are recovery shares.
        let init = sealing.init(3, 2).await.unwrap();
        assert!(sealing.unsealed().is_some());

        // The operator seals. An automatic attempt (what the start-up retries run) works the
        // HSM fine, and still leaves the server sealed.
        sealing.seal().await.unwrap();
        assert!(sealing.operator_sealed());
        assert!(!sealing.auto_unseal().await.unwrap(), "an automatic unseal overrode the operator's seal");
        assert!(sealing.unsealed().is_none());

        // The operator unseals with the recovery shares; a later seal is again the operator's.
        let share = |i: usize| String::from_utf8(init.shares[i].expose().to_vec()).unwrap();
        sealing.submit_unseal_share(&share(0), false).await.unwrap();
        sealing.submit_unseal_share(&share(2), false).await.unwrap();
        assert!(sealing.unsealed().is_some() && !sealing.operator_sealed());
        sealing.seal().await.unwrap();
        assert!(!sealing.auto_unseal().await.unwrap());
        assert!(sealing.unsealed().is_none());

        // Control: a new start (a new sealing state over the same store) unseals by itself.
        drop(sealing);
        let restarted = Sealing::with_hsm(store, hsm, None);
        assert!(restarted.auto_unseal().await.unwrap(), "a fresh start unseals through the HSM");
        assert!(restarted.unsealed().is_some());
    });
}
