"""Stand-in for timm's train.py, which ships in neither the timm wheel nor the sdist.

It reproduces the parts of timm 1.0.x `train.py` that decide whether a plugin's models can be trained:
a `-c/--config` YAML pre-parser whose keys become the main parser's defaults (`device_modules: [...]` works
there), `--device-modules` imported with `importlib.import_module` before the model is created, then
`timm.create_model(args.model, ...)`, `resolve_data_config`, `create_optimizer_v2` and one training step.
Prints a JSON line with what it did.
"""
import argparse
import importlib
import json

import torch
import yaml

config_parser = argparse.ArgumentParser(description='Training Config', add_help=False)
config_parser.add_argument('-c', '--config', default='', type=str, metavar='FILE')

parser = argparse.ArgumentParser(description='timm train.py stand-in')
parser.add_argument('--model', default='resnet50', type=str)
parser.add_argument('--num-classes', type=int, default=None)
parser.add_argument('--device-modules', default=None, type=str, nargs='+')
parser.add_argument('-b', '--batch-size', type=int, default=2)
parser.add_argument('--lr', type=float, default=0.05)


def _parse_args():
    args_config, remaining = config_parser.parse_known_args()
    if args_config.config:
        with open(args_config.config, 'r') as f:
            parser.set_defaults(**yaml.safe_load(f))
    return parser.parse_args(remaining)


def main():
    args = _parse_args()
    if args.device_modules:
        for module in args.device_modules:
            importlib.import_module(module)

    import timm
    from timm.data import resolve_data_config
    from timm.optim import create_optimizer_v2

    model = timm.create_model(args.model, pretrained=False, in_chans=3, num_classes=args.num_classes, drop_rate=0.)
    data_config = resolve_data_config(vars(args), model=model)
    optimizer = create_optimizer_v2(model, opt='momentum', lr=args.lr, weight_decay=1e-4)
    x = torch.randn(args.batch_size, *data_config['input_size'])
    y = torch.randint(0, model.num_classes, (args.batch_size,))
    loss = torch.nn.functional.cross_entropy(model(x), y)
    optimizer.zero_grad()
    loss.backward()
    optimizer.step()
    print(json.dumps(dict(model=args.model, input_size=list(data_config['input_size']), loss=loss.item(),
                          num_classes=model.num_classes)))


if __name__ == '__main__':
    main()
