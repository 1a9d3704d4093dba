"""Stand-in for timm's validate.py: no `--device-modules` flag; it creates `--model` from timm's registry.

Also reports what a script run as `python script.py` sees (`__name__`, `sys.argv[0]`, its folder on
`sys.path`, a sibling-module import) and exits with `--exit-code` if given.
"""
import argparse
import json
import os
import sys

import torch

parser = argparse.ArgumentParser(description='timm validate.py stand-in')
parser.add_argument('--model', default='resnet50')
parser.add_argument('--num-classes', type=int, default=None)
parser.add_argument('--exit-code', type=int, default=None)


def main():
    args = parser.parse_args()
    import timm
    from timm.data import resolve_data_config

    model = timm.create_model(args.model, pretrained=False, num_classes=args.num_classes).eval()
    data_config = resolve_data_config({}, model=model)
    with torch.no_grad():
        out = model(torch.randn(2, *data_config['input_size']))
    import _sibling_helper  # resolvable only if the script's folder is on sys.path, as under `python script.py`
    print(json.dumps(dict(
        model=args.model, logits=list(out.shape), name=__name__, argv0=os.path.basename(sys.argv[0]),
        sibling=_sibling_helper.VALUE, timm_file=timm.__file__)))
    if args.exit_code is not None:
        sys.exit(args.exit_code)


if __name__ == '__main__':
    main()
