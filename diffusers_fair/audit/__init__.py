r"""
`diffusers-fair audit`: measure a pipeline's (and its adaptors') demographic bias on a prompt set, resumably, and
write a report (`report.json`, `report.csv`, `report.md`, `index.html` with plots and annotated image grids).

    diffusers-fair audit --model PATH_OR_ID [--lora PATH_OR_ID ...] [--compare-base] --prompts SET_OR_FILE \
        --classifier PATH_OR_ID [--attributes gender,race] --num-images-per-prompt 64 --batch-size 16 --steps 20 \
        --guidance-scale 7.5 --seed 0 [--clip MODEL] [--dino MODEL] [--face-detector NAME] --output DIR

(also `python -m diffusers_fair.audit ...`). The generation, classification and similarity maths are those of
[`diffusers_fair.metrics`]; this package adds the command line, the per-prompt cache and the report.
"""

from .core import AuditConfig, main, parse_args, run_audit

__all__ = ["AuditConfig", "main", "parse_args", "run_audit"]
