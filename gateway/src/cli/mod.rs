//! The `gateway` command line: `serve`, and the one-off operator commands over the store.
//!
//! Owns: parsing the command line ([`args`]) and sending each subcommand to the function
//! that does it: [`serve`], the directory of tenants, plans and keys ([`directory`]),
//! prices, invoices and exports ([`finance`]), usage reports ([`usage`]) and admin tokens
//! and their revocation ([`token`]), and store upkeep for deployments ([`store`]: migrate,
//! ship a spool); [`output`] prints for all of them. Must never: hold business rules; the
//! library's stores and billing do.

mod args;
mod classifier;
mod directory;
mod finance;
mod output;
mod serve;
mod store;
mod token;
mod usage;

pub use args::Cli;
use args::Command;

/// Runs the command line's subcommand.
pub async fn run(cli: Cli) -> anyhow::Result<()> {
    let json = cli.json;
    match cli.command {
        Command::Serve(config) => serve::serve(*config).await,
        Command::CreateKey(a) => directory::create_key(a, json).await,
        Command::CreatePlan(a) => directory::create_plan(a, json).await,
        Command::SetPlan(a) => directory::set_plan(a, json).await,
        Command::ListTenants(a) => directory::list_tenants(a, json).await,
        Command::ListPlans(a) => directory::list_plans(a, json).await,
        Command::ListKeys(a) => directory::list_keys(a, json).await,
        Command::ListBatches(a) => directory::list_batches(a, json).await,
        Command::RotateKey(a) => directory::rotate_key(a, json).await,
        Command::RevokeKey(a) => directory::revoke_key(a, json).await,
        Command::AddPrice(a) => finance::add_price(a, json).await,
        Command::ListPrices(a) => finance::list_prices(a, json).await,
        Command::Invoice(a) => finance::invoice(a, json).await,
        Command::Export(a) => finance::export(a).await,
        Command::Reconcile(a) => finance::reconcile(a, json).await,
        Command::Usage(a) => usage::usage(a, json).await,
        Command::CreateClassifier(a) => classifier::create(a, json).await,
        Command::Top(a) => usage::top(a, json).await,
        Command::AdminToken(a) => token::admin_token(a, json),
        Command::Migrate(a) => store::migrate(a, json).await,
        Command::ShipSpool(a) => store::ship_spool(a, json).await,
        Command::RevokeAdminToken(a) => token::revoke_admin_token(a, json).await,
    }
}
