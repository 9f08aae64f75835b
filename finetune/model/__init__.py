"""The network: timm backbones, heads on earlier stages, the saved model artifact."""
