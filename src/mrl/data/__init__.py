"""Datamodules: Fashion-MNIST (the embedded default), ImageFolder trees and synthetic images."""
