"""`tunesmith audit privacy`: parse, call the audit flow, print."""

from __future__ import annotations

from pathlib import Path

import typer

from tunesmith.cli.common import err, friendly, out

audit_app = typer.Typer(no_args_is_help=True, help="Audit a finished run.")


@audit_app.command("privacy")
@friendly
def privacy_cmd(
    run_dir: Path = typer.Argument(..., help="A finished run trained with train.privacy."),
    canaries: int = typer.Option(5, "--canaries", min=1, help="Secret canaries inserted."),
    repeats: int = typer.Option(10, "--repeats", min=1, help="Times each canary is repeated "
                                "in the training data."),
    candidates: int = typer.Option(1000, "--candidates", min=10, help="Random secrets each "
                                   "canary is ranked among (exposure ceiling: log2(n+1) bits)."),
    members: int = typer.Option(200, "--members", min=10, help="Training and test examples "
                                "each for membership inference."),
    seed: int = typer.Option(0, "--seed", help="Seed of the canaries and samples."),
    progress: bool = typer.Option(True, "--progress/--no-progress", help="Progress bars."),
) -> None:
    """Train the run's DP and non-DP twins with secret canaries; report canary exposure and
    membership-inference AUC side by side (privacy_audit.json, metrics.json, the report)."""
    from tunesmith.flows.privacy_audit import audit_privacy

    found = audit_privacy(run_dir, canaries=canaries, repeats=repeats, n_candidates=candidates,
                          members=members, seed=seed, show_progress=progress,
                          say=lambda m: err.print(m, highlight=False))
    out.print(f"{'':28} {'with DP':>10} {'without DP':>11}", highlight=False)
    for name, key in (("canary exposure, mean (bits)", "mean_exposure"),
                      ("canary exposure, max (bits)", "max_exposure"),
                      ("membership-inference AUC", "membership_auc")):
        out.print(f"{name:28} {found['dp'][key]:10.3f} {found['no_dp'][key]:11.3f}",
                  highlight=False)
    dp_ci, no_ci = found["dp"]["membership_auc_ci"], found["no_dp"]["membership_auc_ci"]
    out.print(f"{'  95% interval':28} {dp_ci[0]:.3f}-{dp_ci[1]:.3f} {no_ci[0]:.3f}-{no_ci[1]:.3f}",
              highlight=False)
    out.print(f"chance exposure: {found['dp']['chance_exposure']:.2f} bits; ceiling "
              f"{found['dp']['exposure_ceiling']:.2f} bits; epsilon "
              f"{(found['dp'].get('privacy') or {}).get('epsilon', float('nan')):.2f}",
              highlight=False)
