"""volumed.metrics"""
