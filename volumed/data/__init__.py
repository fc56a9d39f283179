"""volumed.data"""
