"""Amazon CAPI relay: conversion events from CDPs to the Amazon Ads Events API."""

__version__ = "0.1.0"
