//! The echo responder: a separate client process that answers every request with its payload.

use std::io::Write;
use std::time::Duration;

use futures_util::StreamExt;
use tokio::sync::oneshot;

use crate::args::ResponderArgs;
use crate::{connect, Error, SUBJECT};

/// Line the responder writes on stdout once its subscription is live on the server.
pub const READY: &str = "ready";

/// Serves `bench.echo` until stdin reaches end of file (the parent closed it or died), the
/// connection's subscription ends, or `max_lifetime` has passed.
pub async fn run(args: &ResponderArgs) -> Result<(), Error> {
    let client = connect(&args.url, "nats-bench responder").await?;
    let mut requests = client.subscribe(SUBJECT).await?;
    // Once the flush returns the server has processed our SUB, so requests will find us.
    client.flush().await?;

    let mut stdout = std::io::stdout().lock();
    writeln!(stdout, "{READY}")?;
    stdout.flush()?;
    drop(stdout);

    // A plain thread, not tokio's stdin: its blocking read cannot be cancelled and would hold up
    // the runtime's shutdown, while a thread stuck in `read` does not keep the process alive.
    let (closed_tx, mut stdin_closed) = oneshot::channel::<()>();
    std::thread::spawn(move || {
        // The parent never writes: this returns at end of file or on an error, both meaning "stop".
        let _ = std::io::copy(&mut std::io::stdin().lock(), &mut std::io::sink());
        let _ = closed_tx.send(());
    });
    let lifetime = tokio::time::sleep(args.max_lifetime);
    tokio::pin!(lifetime);

    loop {
        tokio::select! {
            message = requests.next() => {
                let Some(message) = message else { break };
                if let Some(reply) = message.reply {
                    client.publish(reply, message.payload).await?;
                }
            }
            _ = &mut stdin_closed => break,
            () = &mut lifetime => break,
        }
    }

    // Send what is still buffered, but do not hang on a server that went away.
    let _ = tokio::time::timeout(Duration::from_secs(2), client.flush()).await;
    Ok(())
}
