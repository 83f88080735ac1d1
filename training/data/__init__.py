"""Datasets: import (importers/), records and their checks (schema), curation and versions."""
