"""pisa"""
