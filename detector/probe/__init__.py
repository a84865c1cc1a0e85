"""Local-property probes of a model around an input (Aghdam, Heravi & Puig 2017; issue 14).

- :mod:`.isotropy`: output change along random ± directions of equal norm (isotropy, symmetry);
- :mod:`.mantel`: Mantel correlation of input and output distance matrices of a neighbourhood (scikit-bio);
- :mod:`.lipschitz`: local Lipschitz estimate along probed directions;
- :mod:`.run`: all probes per input, summaries, AUC as a detection signal; :mod:`.report`: JSON + HTML.
"""

from .isotropy import isotropy_symmetry, random_directions
from .lipschitz import lipschitz_from_outputs, local_lipschitz
from .mantel import mantel_statistic, neighbourhood_mantel
from .run import (
    BASELINES,
    PROBES,
    REPORTED,
    ProbeConfig,
    auc_with_interval,
    confidence_correlation,
    probe_images,
    probe_one,
    summarize,
)

__all__ = [
    "BASELINES", "PROBES", "REPORTED", "ProbeConfig", "auc_with_interval", "confidence_correlation", "isotropy_symmetry", "lipschitz_from_outputs", "local_lipschitz",
    "mantel_statistic", "neighbourhood_mantel", "probe_images", "probe_one", "random_directions", "summarize",
]
