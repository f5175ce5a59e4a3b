//! Secrets read from Supabase Vault, by name.

use crate::spi::read_one;
use pgrx::datum::DatumWithOid;
use pgrx::prelude::*;

/// The value of a Supabase Vault secret (`vault.decrypted_secrets`, by name).
/// `setting` names the setting that points at it, for the message.
pub fn vault_secret(name: &str, setting: &str) -> Result<String, String> {
    let vault = read_one::<bool>(
        "SELECT to_regclass('vault.decrypted_secrets') IS NOT NULL",
        &[],
    )
    .unwrap_or(false);
    if !vault {
        return Err(format!(
            "{setting} = '{name}' names a Supabase Vault secret, but this database has no vault.decrypted_secrets: \
             CREATE EXTENSION supabase_vault (and store the secret with vault.create_secret), or set the value directly"
        ));
    }
    let args: [DatumWithOid; 1] = [name.into()];
    // Read-only: a re-read every few seconds assigns no transaction id.
    match Spi::connect(|client| {
        client
            .select(
                "SELECT (SELECT decrypted_secret FROM vault.decrypted_secrets WHERE name = $1 LIMIT 1)",
                Some(1),
                &args,
            )?
            .first()
            .get_one::<String>()
    }) {
        Ok(Some(value)) if !value.is_empty() => Ok(value),
        Ok(_) => Err(format!(
            "{setting} = '{name}': Supabase Vault has no secret of that name (or it is empty); \
             create it with SELECT vault.create_secret('<value>', '{name}')"
        )),
        Err(e) => Err(format!(
            "{setting} = '{name}': reading the Vault secret failed: {e}"
        )),
    }
}
