//! The admin-token command: a signed admin API token for an operator or a script.
//!
//! Owns: finding the admin secret (flag, variable or file) and issuing the token.
//! Must never: print the secret.

use super::args::AdminToken;
use super::output;

pub fn admin_token(a: AdminToken, json: bool) -> anyhow::Result<()> {
    let Some(secret) = gateway::admin::token::resolve_secret(
        a.admin_jwt_secret.as_ref(),
        a.admin_jwt_secret_file.as_deref(),
    )
    .map_err(anyhow::Error::msg)?
    else {
        anyhow::bail!(
            "no admin secret: set GATEWAY_ADMIN_JWT_SECRET_FILE or --admin-jwt-secret-file"
        );
    };
    let token = gateway::admin::TokenAuthority::new(&secret)
        .issue(&a.subject, a.role, a.ttl_secs)
        .map_err(|e| anyhow::anyhow!("{e}"))?;
    if json {
        return output::json(
            &serde_json::json!({"token": token, "role": a.role, "expires_in": a.ttl_secs}),
        );
    }
    println!("{token}");
    Ok(())
}
