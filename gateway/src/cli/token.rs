//! The admin-token commands: a signed admin API token for an operator or a script, and
//! revoking one by its `jti`.
//!
//! Owns: finding the admin secret (flag, variable or file), issuing the token within the
//! maximum lifetime, and writing a revocation to the store. Must never: print the secret.

use super::args::{AdminToken, RevokeAdminToken};
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
    let authority = gateway::admin::TokenAuthority::new(&secret)
        .with_max_lifetime(a.admin_token_max_lifetime_secs);
    let token = authority
        .issue(&a.subject, a.role, a.ttl_secs)
        .map_err(|e| anyhow::anyhow!("{e}"))?;
    if json {
        let claims = authority
            .verify(&token)
            .map_err(|e| anyhow::anyhow!("{e}"))?;
        return output::json(&serde_json::json!({"token": token, "role": a.role,
            "expires_in": a.ttl_secs, "jti": claims.jti}));
    }
    println!("{token}");
    Ok(())
}

pub async fn revoke_admin_token(a: RevokeAdminToken, json: bool) -> anyhow::Result<()> {
    use gateway::admin::revocation;
    if a.jti.is_empty() || a.jti.len() > revocation::MAX_JTI_LEN {
        anyhow::bail!("a jti is 1 to {} bytes", revocation::MAX_JTI_LEN);
    }
    let db = a.store.connect().await?;
    let revoked = revocation::revoke(&db, &a.jti, "cli").await?;
    db.close().await;
    if json {
        return output::json(&revoked);
    }
    println!("revoked admin token {}", revoked.jti);
    Ok(())
}
