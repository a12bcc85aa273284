"""``python -m tunesmith.flows.tune TRIAL_DIR``: one trial's process (see ``trial``)."""

import sys

from tunesmith.flows.tune.trial import main

sys.exit(main(sys.argv[1:]))
