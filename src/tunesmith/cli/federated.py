"""`tunesmith federated simulate|server|client`: parse, call the federated flow, print."""

from __future__ import annotations

from pathlib import Path

import typer

from tunesmith.cli.common import friendly, out

federated_app = typer.Typer(no_args_is_help=True, help="Federated fine-tuning on Flower: "
                            "clients train on their own data, only adapters travel.")


def _print(result: object) -> None:
    for r in result.rounds:  # type: ignore[attr-defined]
        loss = r.get("valid_loss")
        out.print(f"round {r['round']}: {len(r['clients'])} client(s) answered, "
                  f"{len(r['failures'])} failed" + (f", validation loss {loss:.4f}"
                                                     if loss is not None else ""))
    out.print(f"run directory: {result.run_dir}")  # type: ignore[attr-defined]


@federated_app.command("simulate")
@friendly
def simulate_cmd(
    config: Path = typer.Argument(..., help="Run configuration (YAML) with a federated: "
                                  "section."),
    overwrite: bool = typer.Option(False, "--overwrite", help="Replace the run directory."),
    resume: bool = typer.Option(False, "--resume", help="Continue after the last saved round."),
) -> None:
    """Run the federation on this machine: a SuperLink and one SuperNode per client."""
    from tunesmith.flows.federated import simulate

    _print(simulate(config, overwrite=overwrite, resume=resume))


@federated_app.command("server")
@friendly
def server_cmd(
    config: Path = typer.Argument(..., help="Run configuration (YAML) with a federated: "
                                  "section."),
    address: str = typer.Option("0.0.0.0:9092", "--address", help="host:port to listen on."),
    certfile: Path | None = typer.Option(None, "--ssl-certfile", help="TLS certificate."),
    keyfile: Path | None = typer.Option(None, "--ssl-keyfile", help="TLS private key."),
    ca_certfile: Path | None = typer.Option(None, "--ssl-ca-certfile", help="TLS CA cert."),
    overwrite: bool = typer.Option(False, "--overwrite", help="Replace the run directory."),
    resume: bool = typer.Option(False, "--resume", help="Continue after the last saved round."),
) -> None:
    """Start the Flower SuperLink and the run; clients join with `federated client`."""
    from tunesmith.flows.federated import serve

    _print(serve(config, address=address, certfile=certfile, keyfile=keyfile,
                 ca_certfile=ca_certfile, overwrite=overwrite, resume=resume))


@federated_app.command("client")
@friendly
def client_cmd(
    config: Path = typer.Option(..., "--config", help="Run configuration (YAML): the same "
                                "model and train sections as the server's."),
    server: str = typer.Option(..., "--server", help="The server's host:port."),
    data: Path = typer.Option(..., "--data", help="This client's data file; it never leaves "
                              "this machine."),
    root_certificates: Path | None = typer.Option(
        None, "--root-certificates", help="CA certificate of a TLS server. Empty: insecure."),
    retries: int = typer.Option(5, "--retries", min=1, help="Tries to reach the server."),
) -> None:
    """Join a federated run as one client (a Flower SuperNode training on --data)."""
    from tunesmith.flows.federated import join

    join(config, server=server, data=data, root_certificates=root_certificates,
         max_retries=retries)
    out.print("the server ended the run")


@federated_app.command("alone")
@friendly
def alone_cmd(
    config: Path = typer.Argument(..., help="The federated run's configuration (YAML); "
                                  "federated.eval_file is what each client is scored on."),
    overwrite: bool = typer.Option(False, "--overwrite", help="Train the baseline again."),
) -> None:
    """The baseline: each client trained alone on its own data for as many steps as in the
    whole federation, scored on federated.eval_file as the global model is."""
    from tunesmith.flows.federated.alone import alone
    from tunesmith.flows.federated.rounds import read_rounds

    result = alone(config, overwrite=overwrite)
    for c in result.clients:
        acc, loss = c.get("accuracy"), c.get("valid_loss")
        out.print(f"client {c['client']}: {c['num_examples']} examples, {c['steps']} steps"
                  + (f", accuracy {acc:.4f}" if acc is not None else "")
                  + (f", loss on eval_file {loss:.4f}" if loss is not None else ""))
    mean = result.mean_accuracy
    if mean is not None:
        out.print(f"clients alone: mean accuracy {mean:.4f}")
    last = (read_rounds(result.run_dir) or [{}])[-1]
    if mean is not None and last.get("global_accuracy") is not None:
        out.print(f"federated global model after round {last['round']}: accuracy "
                  f"{last['global_accuracy']:.4f} ({100 * (last['global_accuracy'] - mean):+.1f}"
                  " points over the clients alone)")
    out.print(f"written: {result.run_dir / 'alone' / 'alone.json'}")


def register(app: typer.Typer) -> None:
    app.add_typer(federated_app, name="federated")
